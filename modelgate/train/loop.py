"""The training loop: Adam and cross-entropy over the loaded arrays, early stopping on the
validation loss, the best epoch's weights kept."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from modelgate._torch import import_torch
from modelgate.train.dataset import Dataset
from modelgate.train.errors import TrainingError

if TYPE_CHECKING:
    import torch

__all__ = ["Fitted", "check_output_size", "evaluate", "fit_module"]

log = logging.getLogger("modelgate.train")


@dataclass(frozen=True)
class Fitted:
    """One entry per epoch run (loss, accuracy, val_loss, val_accuracy, seconds), and the
    epoch whose weights the module now holds."""

    history: list[dict[str, Any]]
    best_epoch: int


def check_output_size(
    module: torch.nn.Module, batch: np.ndarray, labels: int, device: torch.device
) -> None:
    """One forward pass: the module must give (batch, labels) outputs."""
    torch = import_torch()
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module.to(device)(torch.from_numpy(batch).to(device))
    except Exception as exc:  # any torch error: the module cannot take this input
        raise TrainingError(
            f"the model cannot take a batch of shape {tuple(batch.shape)}: {exc}"
        ) from exc
    finally:
        module.train(was_training)
    shape = tuple(out.shape)
    if len(shape) != 2 or shape[1] != labels:
        raise TrainingError(
            f"the model's output has shape {shape} for a batch of {batch.shape[0]}, but "
            f"there are {labels} labels: its last layer must give {labels} values per image"
        )


def fit_module(
    module: torch.nn.Module,
    data: Dataset,
    *,
    device: torch.device,
    epochs: int,
    batch_size: int,
    lr: float,
    patience: int | None,
    progress: bool,
    seed: int,
) -> Fitted:
    """Train `module` in place; stop when the validation loss (the training loss without a
    validation split) has not improved for `patience` epochs, and restore the best epoch's
    weights. The module is left in eval mode."""
    torch = import_torch()
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    module = module.to(device)
    train_x = torch.from_numpy(data.train_x).to(device)
    train_y = torch.from_numpy(data.train_y).to(device)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    batches = math.ceil(len(train_y) / batch_size)
    best: tuple[float, int, dict[str, Any]] | None = None
    history: list[dict[str, Any]] = []
    bar = tqdm(total=epochs * batches, desc="training", unit="batch", disable=not progress)
    try:
        for epoch in range(1, epochs + 1):
            epoch_started = time.monotonic()
            module.train()
            order = torch.randperm(len(train_y), generator=generator).to(device)
            total_loss, correct = 0.0, 0
            for start in range(0, len(train_y), batch_size):
                index = order[start : start + batch_size]
                optimizer.zero_grad()
                logits = module(train_x[index])
                loss = loss_fn(logits, train_y[index])
                loss.backward()
                optimizer.step()
                total_loss += float(loss.detach()) * len(index)
                correct += int((logits.argmax(1) == train_y[index]).sum())
                bar.update(1)
            entry: dict[str, Any] = {
                "epoch": epoch,
                "loss": total_loss / len(train_y),
                "accuracy": correct / len(train_y),
            }
            if len(data.val_y):
                entry["val_loss"], entry["val_accuracy"] = evaluate(
                    module, data.val_x, data.val_y, batch_size=batch_size, device=device
                )
            entry["seconds"] = time.monotonic() - epoch_started
            history.append(entry)
            bar.set_postfix(
                epoch=epoch,
                loss=f"{entry['loss']:.3f}",
                val_acc=f"{entry.get('val_accuracy', float('nan')):.3f}",
            )
            watched = entry.get("val_loss", entry["loss"])
            if best is None or watched < best[0]:
                best = (watched, epoch, copy.deepcopy(module.state_dict()))
            elif patience is not None and epoch - best[1] >= patience:
                log.info("early stop after epoch %d (best %d)", epoch, best[1])
                break
    finally:
        bar.close()
    assert best is not None
    module.load_state_dict(best[2])
    module.eval()
    return Fitted(history, best[1])


def evaluate(
    module: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of `module` (put in eval mode) on (x, y)."""
    torch = import_torch()
    module.eval()
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            xb = torch.from_numpy(x[start : start + batch_size]).to(device)
            yb = torch.from_numpy(y[start : start + batch_size]).to(device)
            logits = module(xb)
            total_loss += float(loss_fn(logits, yb))
            correct += int((logits.argmax(1) == yb).sum())
    return total_loss / len(y), correct / len(y)

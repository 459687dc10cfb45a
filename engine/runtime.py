"""onnxruntime sessions: loading a model, checking it fits its spec, running batches.

Everything onnxruntime raises is converted here: at load into `InvalidModel`, at run into
`PredictionError`. `CompiledModel.run` and `run_items` are synchronous and meant to be
called from a worker thread (`trio.to_thread.run_sync`); onnxruntime releases the GIL while
it computes.

Tensor and image models have one input, fed a stacked batch of items. Text models have
named inputs (input_ids, attention_mask, optionally token_type_ids) with dynamic batch and
sequence axes; their items are strings, tokenized by `run_items` in the same thread as the
run (engine.inputs.text). An image model's items may be its images' bytes
(engine.inputs.image.EncodedImage), decoded by `run_items` in the run's thread too: one
thread hop for a whole batch instead of one per image.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from engine.errors import InvalidModel, ModelgateError, PredictionError
from engine.inputs.image import BadImage, EncodedImage, decode_item
from engine.inputs.text import (
    ATTENTION_MASK,
    INPUT_IDS,
    TEXT_INPUTS,
    TOKEN_TYPE_IDS,
    NoTokens,
    TextEncoder,
)
from engine.outputs import pool_token_states
from engine.spec import (
    ClassifyPostprocess,
    EmbeddingPostprocess,
    ImagePreprocess,
    ModelSpec,
    TextPreprocess,
)

__all__ = [
    "CompiledModel",
    "RuntimeSettings",
    "intra_op_threads",
    "load_model",
    "report_onnxruntime",
    "resolve_providers",
]

log = logging.getLogger(__name__)

_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"
_TENSORRT = "TensorrtExecutionProvider"

# ONNX tensor type strings as onnxruntime reports them -> numpy dtypes.
_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class RuntimeSettings:
    # None = auto: TensorRT (only if `tensorrt` and available), CUDA if available, then CPU.
    providers: tuple[str, ...] | None = None
    tensorrt: bool = False
    intra_op_threads: int = 0  # 0: the usable cores shared by max_concurrent_runs runs
    inter_op_threads: int = 0
    max_concurrent_runs: int = 2  # size of the CapacityLimiter shared by all models


def intra_op_threads(settings: RuntimeSettings) -> int:
    """The threads of one run where the settings leave it open: the usable cores shared by
    the `max_concurrent_runs` runs that may run at once. onnxruntime's own choice (one
    per physical core, spinning while idle, for every run) oversubscribes the cores as
    soon as two runs overlap, and its spinning takes the CPU from the event loop and, on
    a shared host, from the database: on 2 cores the digits CNN cost 1.5 times the CPU
    per document with it."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, settings.max_concurrent_runs))


def resolve_providers(settings: RuntimeSettings) -> list[str]:
    if settings.providers is not None:
        return list(settings.providers)
    available = set(ort.get_available_providers())
    providers = []
    if settings.tensorrt and _TENSORRT in available:
        providers.append(_TENSORRT)
    if _CUDA in available:
        providers.append(_CUDA)
    providers.append(_CPU)
    return providers


def report_onnxruntime(settings: RuntimeSettings) -> None:
    """At start: log the onnxruntime build this process got and its providers, and warn
    when GPU providers were asked for that it lacks (onnxruntime itself would fall back to
    the CPU with a line at the first model). When CUDA will be used, load the CUDA and cuDNN
    libraries that pip installed beside onnxruntime-gpu (the `gpu` extra): onnxruntime does
    not look for them there unless asked to."""
    available = ort.get_available_providers()
    builds = _installed_builds()
    cuda = getattr(ort, "cuda_version", "")
    log.info(
        "onnxruntime build: %s%s; providers available: %s",
        " and ".join(builds) or f"module {ort.__version__} of no installed package",
        f" (CUDA {cuda})" if cuda else "",
        ", ".join(available),
    )
    if len(builds) > 1:
        log.warning(
            "%s all install the one onnxruntime module: this process got whichever pip "
            "wrote last. Uninstall them all, then install one build: pip install "
            "'modelgate[cpu]' or 'modelgate[gpu]'",
            " and ".join(builds),
        )
    asked = [name for name in settings.providers or () if name in (_CUDA, _TENSORRT)]
    if settings.tensorrt:
        asked.append(_TENSORRT)
    missing = [name for name in dict.fromkeys(asked) if name not in available]
    if missing:
        usable = [name for name in resolve_providers(settings) if name in available]
        log.warning(
            "%s asked for but not in this onnxruntime build (%s): models run on %s. For "
            "NVIDIA GPUs install the GPU build: pip install 'modelgate[gpu]'",
            " and ".join(missing),
            " and ".join(builds) or f"onnxruntime {ort.__version__}",
            ", ".join(usable) or _CPU,
        )
    if _CUDA in available and _CUDA in resolve_providers(settings) and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def _installed_builds() -> list[str]:
    """The packages that installed the `onnxruntime` module, as "onnxruntime-gpu 1.22.0"."""
    names = dict.fromkeys(importlib.metadata.packages_distributions().get("onnxruntime", ()))
    return [f"{name} {importlib.metadata.version(name)}" for name in names]


def _dim_text(shape: list[Any] | tuple[Any, ...]) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else repr(d) for d in shape) + "]"


class CompiledModel:
    """One loaded version of one model. Thread-safe: `run` may be called concurrently."""

    def __init__(
        self,
        spec: ModelSpec,
        version: int,
        session: ort.InferenceSession,
        *,
        input_dtype: np.dtype[Any],
        item_shape: tuple[int, ...],
        max_batch: int | None,
        text: TextEncoder | None = None,
    ) -> None:
        self.spec = spec
        self.version = version
        self.session = session
        self.providers: tuple[str, ...] = tuple(session.get_providers())
        self.input_name: str = session.get_inputs()[0].name
        self.output_name: str = session.get_outputs()[0].name
        self.input_dtype = input_dtype
        self.item_shape = item_shape
        self.max_batch = max_batch  # None: any batch size; else the model's fixed batch size
        self.text = text  # text models: their tokenizer and inputs; items are strings
        # With CUDA the output is bound to the device (IO binding); on CPU plain `run` is best.
        self.output_device: str | None = "cuda" if _CUDA in self.providers else None

    def __repr__(self) -> str:
        if self.text is not None:
            inputs = f"text inputs={list(self.text.inputs)} maxLength={self.text.max_length}"
        else:
            inputs = f"input={self.input_name} {self.input_dtype}{list(self.item_shape)}"
        return (
            f"CompiledModel({self.spec.name!r} v{self.version}, {inputs}, "
            f"max_batch={self.max_batch}, providers={list(self.providers)})"
        )

    def run_items(self, items: Sequence[Any]) -> np.ndarray | list[np.ndarray | PredictionError]:
        """One row per item, ready for engine.outputs.postprocess_rows: arrays of
        `item_shape` (stacked and run) or, for text models, strings (tokenized together,
        then run). Embedding models' token states are pooled here, where the attention
        mask is at hand. A text that gives no tokens gets a NoTokens error as its row; any
        other failure raises PredictionError for the whole batch."""
        if self.text is not None:
            return self._run_texts(items)
        if items and isinstance(items[0], EncodedImage):
            return self._run_images(items)
        out = self.run(np.stack(items))
        post = self.spec.postprocess
        return pool_token_states(out, None, post) if isinstance(post, EmbeddingPostprocess) else out

    def _run_images(self, images: Sequence[EncodedImage]) -> list[np.ndarray | PredictionError]:
        """Decode each image (one that does not decode gets its BadImage as its row),
        then run those that did as one batch."""
        pre = self.spec.preprocess
        assert isinstance(pre, ImagePreprocess)
        rows: list[np.ndarray | PredictionError] = []
        arrays: list[np.ndarray] = []
        for image in images:
            try:
                arrays.append(decode_item(image, pre))
                rows.append(arrays[-1])
            except BadImage as e:
                rows.append(e)
        if not arrays:
            return rows
        out = iter(self.run_items(arrays))  # type: ignore[arg-type]
        return [row if isinstance(row, PredictionError) else next(out) for row in rows]

    def _run_texts(self, texts: Sequence[Any]) -> list[np.ndarray | PredictionError]:
        assert self.text is not None
        encoded = self.text.encode(texts)
        empty = encoded.lengths == 0
        keep = np.flatnonzero(~empty)
        if empty.any():
            encoded = self.text.select(encoded, keep)
        rows: list[np.ndarray | PredictionError] = [NoTokens("the text gives no tokens")] * len(
            texts
        )
        if not len(keep):
            return rows
        out = self._run_checked(encoded.feeds, len(keep))
        post = self.spec.postprocess
        if isinstance(post, EmbeddingPostprocess):
            out = pool_token_states(out, encoded.attention_mask, post)
        for index, row in zip(keep.tolist(), out, strict=True):
            rows[index] = row
        return rows

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run a batch shaped (n, *item_shape); return the first output, one row per item.

        A model with a fixed batch size runs in chunks of that size (the last one padded)."""
        if self.text is not None:
            raise PredictionError(f"model '{self.spec.name}' takes text: use run_items")
        if batch.shape[1:] != self.item_shape:
            raise PredictionError(
                f"batch items have shape {list(batch.shape[1:])}, "
                f"model expects {list(self.item_shape)}"
            )
        batch = np.ascontiguousarray(batch, dtype=self.input_dtype)
        n = batch.shape[0]
        if self.max_batch is None or n == self.max_batch:
            return self._run_checked({self.input_name: batch}, n)
        size = self.max_batch
        outputs = []
        for start in range(0, n, size):
            chunk = batch[start : start + size]
            real = chunk.shape[0]
            if real < size:
                pad = np.zeros((size - real, *self.item_shape), dtype=self.input_dtype)
                chunk = np.concatenate([chunk, pad])
            outputs.append(self._run_checked({self.input_name: chunk}, size)[:real])
        return np.concatenate(outputs)

    def _run_checked(self, feeds: dict[str, np.ndarray], n: int) -> np.ndarray:
        try:
            out = self._run_session(feeds)
        except PredictionError:
            raise
        except Exception as e:  # onnxruntime raises its own Fail/RuntimeException/... types
            raise PredictionError(f"model '{self.spec.name}' failed to run: {e}") from e
        out = np.asarray(out)
        if out.ndim == 0 or out.shape[0] != n:
            raise PredictionError(
                f"model '{self.spec.name}' returned shape {list(out.shape)} for a batch of {n}"
            )
        return out

    def _run_session(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self.output_device is not None:
            # Inputs copied from host once; the output stays on the device until copied out.
            binding = self.session.io_binding()
            for name, array in feeds.items():
                binding.bind_cpu_input(name, array)
            binding.bind_output(self.output_name, self.output_device)
            self.session.run_with_iobinding(binding)
            return np.asarray(binding.copy_outputs_to_cpu()[0])
        return np.asarray(self.session.run([self.output_name], feeds)[0])


def load_model(
    spec: ModelSpec, version: int, onnx_bytes: bytes, settings: RuntimeSettings
) -> CompiledModel:
    """Build a session from ONNX bytes and check that it fits `spec`; raise InvalidModel."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads or intra_op_threads(settings)
    options.inter_op_num_threads = settings.inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only; load problems come back as InvalidModel
    providers = resolve_providers(settings)
    try:
        session = ort.InferenceSession(bytes(onnx_bytes), options, providers=providers)
    except Exception as e:  # InvalidProtobuf, Fail, InvalidGraph, NoSuchFile, ...
        raise InvalidModel(f"model '{spec.name}': onnxruntime cannot load it: {e}") from e

    if isinstance(spec.preprocess, TextPreprocess):
        model = _text_model(spec, version, session, spec.preprocess)
        _check_output(model)
        log.info("loaded %r", model)
        return model
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise InvalidModel(
            f"model '{spec.name}' must have exactly one input, it has {len(inputs)} ({names})"
        )
    if not session.get_outputs():
        raise InvalidModel(f"model '{spec.name}' has no outputs")
    model_input = inputs[0]
    dtype = _DTYPES.get(model_input.type)
    if dtype is None:
        raise InvalidModel(
            f"model '{spec.name}' input '{model_input.name}' has unsupported type "
            f"{model_input.type}"
        )
    shape = list(model_input.shape)
    if not shape:
        raise InvalidModel(
            f"model '{spec.name}' input '{model_input.name}' is a scalar; "
            "it needs a batch dimension first"
        )
    batch_dim = shape[0]
    max_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None

    pre = spec.preprocess
    if isinstance(pre, ImagePreprocess):
        item_shape = _check_image_input(spec, pre, model_input.name, shape, dtype)
    else:
        item_shape = _check_tensor_input(spec, model_input.name, shape)

    model = CompiledModel(
        spec, version, session, input_dtype=dtype, item_shape=item_shape, max_batch=max_batch
    )
    _check_output(model)
    log.info("loaded %r", model)
    return model


def _check_image_input(
    spec: ModelSpec, pre: ImagePreprocess, name: str, shape: list[Any], dtype: np.dtype[Any]
) -> tuple[int, ...]:
    if len(shape) != 4:
        raise InvalidModel(
            f"model '{spec.name}': image preprocess needs a rank-4 input "
            f"({pre.layout}), input '{name}' has shape {_dim_text(shape)}"
        )
    if dtype.kind != "f":
        raise InvalidModel(
            f"model '{spec.name}': image preprocess needs a floating-point input, "
            f"input '{name}' is {dtype}"
        )
    expected = pre.item_shape
    labels = ("C", "H", "W") if pre.layout == "NCHW" else ("H", "W", "C")
    for dim, want, label in zip(shape[1:], expected, labels, strict=True):
        if isinstance(dim, int) and dim > 0 and dim != want:
            raise InvalidModel(
                f"model '{spec.name}': input '{name}' has shape {_dim_text(shape)} but the "
                f"preprocess (mode {pre.mode}, size {list(pre.size)}, layout {pre.layout}) "
                f"gives {label}={want}, expected N{''.join(labels)} = "
                f"{_dim_text(['N', *expected])}"
            )
    return expected


def _check_tensor_input(spec: ModelSpec, name: str, shape: list[Any]) -> tuple[int, ...]:
    item = shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in item):
        # Variable-size items could not be stacked into one batch; keep the contract simple.
        raise InvalidModel(
            f"model '{spec.name}': tensor input '{name}' has shape {_dim_text(shape)}; "
            "every dimension after the batch dimension must be fixed"
        )
    return tuple(int(d) for d in item)


def _check_output(model: CompiledModel) -> None:
    spec = model.spec
    post = spec.postprocess
    output = model.session.get_outputs()[0]
    if isinstance(post, ClassifyPostprocess):
        shape = list(output.shape) if output.shape is not None else []
        last = shape[-1] if shape else None
        if isinstance(last, int) and last > 0 and last != len(post.labels):
            raise InvalidModel(
                f"model '{spec.name}': output '{output.name}' has {last} classes "
                f"(shape {_dim_text(shape)}) but {len(post.labels)} labels were given"
            )
    if model.text is not None:
        out = _smoke_test_text(model)[:1]  # the checks below look at one item
    else:
        # Smoke test: one zero item through the session catches what static shapes cannot.
        dummy = np.zeros((1, *model.item_shape), dtype=model.input_dtype)
        try:
            out = model.run(dummy)
        except PredictionError as e:
            raise InvalidModel(f"model '{spec.name}' failed a test run at load: {e.message}") from e
    if isinstance(post, ClassifyPostprocess):
        classes = math.prod(out.shape[1:])
        if out.ndim < 2 or out.shape[-1] != len(post.labels) or classes != len(post.labels):
            raise InvalidModel(
                f"model '{spec.name}': output '{output.name}' gives shape "
                f"{list(out.shape)} for one item, but {len(post.labels)} labels were given"
            )


# --------------------------------------------------------------------------- text models

#: Texts of different lengths for the test run of a text model at load.
_SAMPLE_TEXTS = ("modelgate", "A short sentence to check that the model runs on text.")


def _text_model(
    spec: ModelSpec, version: int, session: ort.InferenceSession, pre: TextPreprocess
) -> CompiledModel:
    """Check a text model's inputs: input_ids and attention_mask, token_type_ids if it
    wants it, each integer [batch, tokens] with both axes dynamic."""
    inputs = {i.name: i for i in session.get_inputs()}
    wanted = ", ".join(TEXT_INPUTS[:2]) + f" and optionally {TOKEN_TYPE_IDS}"
    unknown = [name for name in inputs if name not in TEXT_INPUTS]
    missing = [name for name in (INPUT_IDS, ATTENTION_MASK) if name not in inputs]
    if unknown or missing:
        raise InvalidModel(
            f"model '{spec.name}': a text model takes the inputs {wanted}; it has "
            f"{', '.join(inputs) or 'none'}"
        )
    if not session.get_outputs():
        raise InvalidModel(f"model '{spec.name}' has no outputs")
    dtypes: dict[str, np.dtype[Any]] = {}
    for name in TEXT_INPUTS:
        if name not in inputs:
            continue
        dtype = _DTYPES.get(inputs[name].type)
        if dtype is None or dtype.kind not in "iu":
            raise InvalidModel(
                f"model '{spec.name}': text input '{name}' must be integers, it is "
                f"{inputs[name].type}"
            )
        shape = list(inputs[name].shape or [])
        if len(shape) != 2 or any(isinstance(d, int) and d > 0 for d in shape):
            raise InvalidModel(
                f"model '{spec.name}': text input '{name}' has shape {_dim_text(shape)}; it "
                "must be [batch, tokens] with both axes dynamic (a batch is padded to its "
                "longest text)"
            )
        dtypes[name] = dtype
    try:
        encoder = TextEncoder(pre, dtypes)
    except ModelgateError as e:
        raise InvalidModel(f"model '{spec.name}': {e.message}") from e
    return CompiledModel(
        spec,
        version,
        session,
        input_dtype=dtypes[INPUT_IDS],
        item_shape=(),
        max_batch=None,
        text=encoder,
    )


def _smoke_test_text(model: CompiledModel) -> np.ndarray:
    """Run the sample texts; check the output's shape against the postprocess."""
    assert model.text is not None
    spec, post = model.spec, model.spec.postprocess
    try:
        encoded = model.text.encode(_SAMPLE_TEXTS)
        if not encoded.lengths.all():
            raise PredictionError("the tokenizer gives no tokens for a sample text")
        out = model._run_checked(encoded.feeds, len(_SAMPLE_TEXTS))
    except PredictionError as e:
        raise InvalidModel(f"model '{spec.name}' failed a test run at load: {e.message}") from e
    _smoke_test_max_length(model)
    if isinstance(post, EmbeddingPostprocess):
        tokens = encoded.attention_mask.shape[1]
        name = model.output_name
        if out.ndim not in (2, 3):
            raise InvalidModel(
                f"model '{spec.name}': output '{name}' gives shape {list(out.shape)}; an "
                "embedding of text needs [batch, tokens, dim] or [batch, dim]"
            )
        if out.ndim == 3 and out.shape[1] != tokens:
            raise InvalidModel(
                f"model '{spec.name}': output '{name}' gives shape {list(out.shape)} for "
                f"{tokens} tokens; token states must be [batch, tokens, dim]"
            )
        if out.ndim == 3 and post.pooling == "none":
            raise InvalidModel(
                f"model '{spec.name}': output '{name}' gives token states {list(out.shape)}; "
                "set postprocess.pooling to 'mean' or 'cls' to get one vector per text"
            )
    return out


def _smoke_test_max_length(model: CompiledModel) -> None:
    """Run one text of maxLength tokens: a maxLength beyond what the model takes (its
    position embeddings, say) is refused now rather than failing every long text later."""
    assert model.text is not None
    name, max_length = model.spec.name, model.text.max_length
    try:
        words = _SAMPLE_TEXTS[1].split()  # a token or more each: max_length words suffice
        encoded = model.text.encode([" ".join(words[i % len(words)] for i in range(max_length))])
    except PredictionError as e:
        raise InvalidModel(f"model '{name}' failed a test run at load: {e.message}") from e
    try:
        model._run_checked(encoded.feeds, 1)
    except PredictionError as e:
        raise InvalidModel(
            f"model '{name}' failed a test run at load on a text of {int(encoded.lengths[0])} "
            f"tokens (maxLength {max_length}): {e.message}"
        ) from e

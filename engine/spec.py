"""The model declaration: what a model says about its input, output and mode, as frozen
dataclasses the engine takes already validated.

`ModelSpec.from_document` is the one validation of a declaration: every wrong value
becomes a MongoDB-shaped error (BadValue for wrong values, TypeMismatch for wrong types;
namespace errors are BadValue throughout). The proxy's registerModel command hands it the
client's fields; the registry reloads what `ModelSpec.to_document` stored with it, which
also refuses a stored document that was changed by hand into something unservable.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import tokenizers

from engine.documents import path_touches
from engine.errors import BadValue, TypeMismatch

__all__ = [
    "DECLARATION_FIELDS",
    "BatchPolicy",
    "ClassifyPostprocess",
    "EmbeddingPostprocess",
    "ImagePreprocess",
    "ModelSpec",
    "Postprocess",
    "Preprocess",
    "RawPostprocess",
    "TensorPreprocess",
    "TextPreprocess",
    "check_tokenizer",
    "parse_tokenizer",
]

#: The fields of a declaration besides its name (registerModel's, and the stored spec's).
DECLARATION_FIELDS = (
    "collection",
    "input",
    "output",
    "mode",
    "preprocess",
    "postprocess",
    "batch",
    "onError",
    "filter",
    "metadata",
)
MAX_NAME_LENGTH = 120
MAX_BATCH_SIZE = 100_000
MODES = ("inline", "deferred")
ON_ERROR = ("reject", "record")
IMAGE_MODES = {"L": 1, "RGB": 3}
LAYOUTS = ("NCHW", "NHWC")
POOLINGS = ("none", "mean", "cls")
MAX_TEXT_LENGTH = 8192  # tokens; the longest context of common text encoders, with room
DEFAULT_TEXT_LENGTH = 256

Mode = Literal["inline", "deferred"]
OnError = Literal["reject", "record"]
Softmax = Literal["auto"] | bool
Pooling = Literal["none", "mean", "cls"]


@dataclass(frozen=True)
class ImagePreprocess:
    """Decode, convert to `mode`, resize to `size` ([H, W]), x / scale, (x - mean) / std."""

    size: tuple[int, int]
    mode: Literal["L", "RGB"] = "RGB"
    scale: float = 255.0
    mean: tuple[float, ...] = ()  # one per channel after parsing
    std: tuple[float, ...] = ()
    layout: Literal["NCHW", "NHWC"] = "NCHW"

    @property
    def channels(self) -> int:
        return IMAGE_MODES[self.mode]

    @property
    def item_shape(self) -> tuple[int, int, int]:
        h, w = self.size
        c = self.channels
        return (c, h, w) if self.layout == "NCHW" else (h, w, c)

    def to_document(self) -> dict[str, Any]:
        return {
            "kind": "image",
            "size": list(self.size),
            "mode": self.mode,
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": self.layout,
        }


@dataclass(frozen=True)
class TensorPreprocess:
    """The field holds numbers (a scalar or nested lists) shaped like one model input item."""

    def to_document(self) -> dict[str, Any]:
        return {"kind": "tensor"}


@dataclass(frozen=True)
class TextPreprocess:
    """The field holds a string, tokenized by `tokenizer` (a Hugging Face tokenizer.json,
    as bytes), truncated at `max_length` tokens; a batch is padded to its longest member.

    The model's inputs are fed by name: input_ids, attention_mask and token_type_ids (the
    last only where the model declares it)."""

    tokenizer: bytes = field(repr=False)  # hundreds of KB: kept out of reprs and logs
    max_length: int = DEFAULT_TEXT_LENGTH

    def to_document(self) -> dict[str, Any]:
        # bytes are stored as BSON BinData (subtype 0) and come back as bytes.
        return {"kind": "text", "tokenizer": self.tokenizer, "maxLength": self.max_length}


@dataclass(frozen=True)
class ClassifyPostprocess:
    labels: tuple[str | int, ...]
    top_k: int = 3
    softmax: Softmax = "auto"

    def to_document(self) -> dict[str, Any]:
        return {
            "kind": "classify",
            "labels": list(self.labels),
            "topK": self.top_k,
            "softmax": self.softmax,
        }


@dataclass(frozen=True)
class EmbeddingPostprocess:
    """A vector per item. For token states [batch, tokens, dim]: `pooling` "mean" (over the
    tokens the attention mask keeps) or "cls" (token 0); "none" keeps what the model gives
    (a pooled [batch, dim] output, flattened). `normalize` scales it to unit L2 length."""

    pooling: Pooling = "none"
    normalize: bool = False

    def to_document(self) -> dict[str, Any]:
        return {"kind": "embedding", "pooling": self.pooling, "normalize": self.normalize}


@dataclass(frozen=True)
class RawPostprocess:
    def to_document(self) -> dict[str, Any]:
        return {"kind": "raw"}


Preprocess = ImagePreprocess | TensorPreprocess | TextPreprocess
Postprocess = ClassifyPostprocess | EmbeddingPostprocess | RawPostprocess


@dataclass(frozen=True)
class BatchPolicy:
    max_size: int = 64
    max_delay_ms: float = 2.0

    def to_document(self) -> dict[str, Any]:
        return {"maxSize": self.max_size, "maxDelayMs": self.max_delay_ms}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    namespace: str  # "db.collection"
    input_field: str
    output_field: str
    mode: Mode
    preprocess: Preprocess
    postprocess: Postprocess
    batch: BatchPolicy = field(default_factory=BatchPolicy)
    on_error: OnError = "reject"
    filter: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None

    @property
    def db(self) -> str:
        return self.namespace.split(".", 1)[0]

    @property
    def collection(self) -> str:
        return self.namespace.split(".", 1)[1]

    def to_document(self) -> dict[str, Any]:
        """A BSON-able dict; `from_document` reads it back to an equal spec."""
        doc: dict[str, Any] = {
            "name": self.name,
            "collection": self.namespace,
            "input": self.input_field,
            "output": self.output_field,
            "mode": self.mode,
            "preprocess": self.preprocess.to_document(),
            "postprocess": self.postprocess.to_document(),
            "batch": self.batch.to_document(),
            "onError": self.on_error,
        }
        if self.filter is not None:
            doc["filter"] = self.filter
        if self.metadata is not None:
            doc["metadata"] = self.metadata
        return doc

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> ModelSpec:
        """The validated spec of a declaration document; the inverse of `to_document`.
        Keys that are not declaration fields (the registry's `_id`, version, ...) are ignored."""
        fields = {k: doc[k] for k in DECLARATION_FIELDS if k in doc}
        if "name" not in doc:
            raise BadValue("missing required field 'name'")
        return _parse_spec(doc["name"], fields)


# --------------------------------------------------------------------------- parsing


def _parse_spec(name_value: Any, fields: Mapping[str, Any]) -> ModelSpec:
    name = _model_name(name_value)
    namespace = _namespace(_required(fields, "collection"))
    input_field = _field_path("input", _required(fields, "input"))
    output_field = _field_path("output", fields.get("output", f"_outputs.{name}"))
    if path_touches(input_field, output_field):
        raise BadValue(
            f"output field '{output_field}' may not be, contain or lie inside "
            f"the input field '{input_field}'"
        )
    if output_field == "_id" or output_field.startswith("_id."):
        raise BadValue("output field may not be '_id'")
    mode = _choice("mode", fields.get("mode", "inline"), MODES)
    on_error = _choice("onError", fields.get("onError", "reject"), ON_ERROR)
    preprocess = _preprocess(_required(fields, "preprocess", default={"kind": "tensor"}))
    postprocess = _postprocess(_required(fields, "postprocess", default={"kind": "raw"}))
    batch = _batch(fields.get("batch", {}))
    filter_doc = _optional_doc("filter", fields.get("filter"))
    metadata = _optional_doc("metadata", fields.get("metadata"))
    return ModelSpec(
        name=name,
        namespace=namespace,
        input_field=input_field,
        output_field=output_field,
        mode=mode,  # type: ignore[arg-type]
        preprocess=preprocess,
        postprocess=postprocess,
        batch=batch,
        on_error=on_error,  # type: ignore[arg-type]
        filter=filter_doc,
        metadata=metadata,
    )


def _required(fields: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = fields.get(key, default)
    if value is None:
        raise BadValue(f"missing required field '{key}'")
    return value


def _type_name(value: Any) -> str:
    return type(value).__name__


def _expect_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeMismatch(f"'{key}' must be a string, got {_type_name(value)}")
    return value


def _expect_doc(key: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeMismatch(f"'{key}' must be a document, got {_type_name(value)}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _expect_number(key: str, value: Any) -> float:
    if not _is_number(value):
        raise TypeMismatch(f"'{key}' must be a number, got {_type_name(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise BadValue(f"'{key}' must be finite, got {value}")
    return number


def _expect_int(key: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)  # drivers (mongosh) send numbers as doubles
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeMismatch(f"'{key}' must be an integer, got {_type_name(value)}")
    return value


def _model_name(value: Any) -> str:
    name = _expect_str("registerModel", value)
    if not name:
        raise BadValue("model name may not be empty")
    if "$" in name or "\x00" in name:
        raise BadValue(f"model name may not contain '$' or NUL: {name!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise BadValue(f"model name is longer than {MAX_NAME_LENGTH} characters")
    return name


def _namespace(value: Any) -> str:
    namespace = _expect_str("collection", value)
    db, dot, coll = namespace.partition(".")
    if not dot or not db or not coll:
        raise BadValue(f"invalid namespace '{namespace}': expected '<database>.<collection>'")
    if "\x00" in namespace or any(c in db for c in '/\\. "$'):
        raise BadValue(f"invalid namespace '{namespace}'")
    if coll.startswith("$"):
        raise BadValue(f"invalid namespace '{namespace}'")
    return namespace


def _field_path(key: str, value: Any) -> str:
    path = _expect_str(key, value)
    if not path:
        raise BadValue(f"'{key}' field path may not be empty")
    if "\x00" in path:
        raise BadValue(f"'{key}' field path may not contain NUL")
    for part in path.split("."):
        if not part:
            raise BadValue(f"'{key}' field path '{path}' has an empty part")
        if part.startswith("$"):
            raise BadValue(f"'{key}' field path '{path}' may not start a part with '$'")
    return path


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    text = _expect_str(key, value)
    if text not in allowed:
        options = ", ".join(f"'{a}'" for a in allowed)
        raise BadValue(f"'{key}' must be one of {options}, got '{text}'")
    return text


def _optional_doc(key: str, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    return dict(_expect_doc(key, value))


def _check_keys(where: str, doc: Mapping[str, Any], allowed: set[str]) -> None:
    for key in doc:
        if key not in allowed:
            raise BadValue(f"{where}: unknown field '{key}'")


def _preprocess(value: Any) -> Preprocess:
    doc = _expect_doc("preprocess", value)
    kind = _expect_str("preprocess.kind", _required(doc, "kind"))
    if kind == "tensor":
        _check_keys("preprocess", doc, {"kind"})
        return TensorPreprocess()
    if kind == "text":
        return _text_preprocess(doc)
    if kind != "image":
        raise BadValue(f"unknown preprocess kind '{kind}': expected 'image', 'tensor' or 'text'")
    _check_keys("preprocess", doc, {"kind", "size", "mode", "scale", "mean", "std", "layout"})
    size_value = _required(doc, "size")
    if not isinstance(size_value, list | tuple):
        raise TypeMismatch(f"'preprocess.size' must be an array, got {_type_name(size_value)}")
    if len(size_value) != 2:
        raise BadValue(f"'preprocess.size' must be [height, width], got {len(size_value)} values")
    size = tuple(_expect_int("preprocess.size", s) for s in size_value)
    if any(s < 1 or s > 16384 for s in size):
        raise BadValue(f"'preprocess.size' values must be in 1..16384, got {list(size)}")
    mode = _choice("preprocess.mode", doc.get("mode", "RGB"), tuple(IMAGE_MODES))
    channels = IMAGE_MODES[mode]
    scale = _expect_number("preprocess.scale", doc.get("scale", 255.0))
    if scale == 0:
        raise BadValue("'preprocess.scale' may not be 0")
    mean = _per_channel("preprocess.mean", doc.get("mean", [0.0]), channels)
    std = _per_channel("preprocess.std", doc.get("std", [1.0]), channels)
    if any(s == 0 for s in std):
        raise BadValue("'preprocess.std' values may not be 0")
    layout = _choice("preprocess.layout", doc.get("layout", "NCHW"), LAYOUTS)
    return ImagePreprocess(
        size=(size[0], size[1]),
        mode=mode,  # type: ignore[arg-type]
        scale=scale,
        mean=mean,
        std=std,
        layout=layout,  # type: ignore[arg-type]
    )


def _text_preprocess(doc: Mapping[str, Any]) -> TextPreprocess:
    _check_keys("preprocess", doc, {"kind", "tokenizer", "maxLength"})
    value = _required(doc, "tokenizer")
    if not isinstance(value, bytes | bytearray | memoryview):  # bson.Binary is a bytes
        raise TypeMismatch(
            "'preprocess.tokenizer' must be binary data (the bytes of a tokenizer.json), "
            f"got {_type_name(value)}"
        )
    data = bytes(value)
    max_length = _expect_int("preprocess.maxLength", doc.get("maxLength", DEFAULT_TEXT_LENGTH))
    if not 1 <= max_length <= MAX_TEXT_LENGTH:
        raise BadValue(f"'preprocess.maxLength' must be in 1..{MAX_TEXT_LENGTH}, got {max_length}")
    check_tokenizer(data)
    return TextPreprocess(tokenizer=data, max_length=max_length)


def check_tokenizer(data: bytes) -> None:
    """BadValue unless `data` (a tokenizer.json) loads. The registry reloads every spec at
    each refresh and loading a real tokenizer takes tens of ms: tokenizers that loaded are
    remembered by digest (a few, in this process)."""
    digest = hashlib.sha256(data).digest()
    with _LOADED_LOCK:  # specs are parsed on the event loop and in worker threads
        if digest in _LOADED_TOKENIZERS:
            return
    parse_tokenizer(data)
    with _LOADED_LOCK:
        _LOADED_TOKENIZERS[digest] = None
        while len(_LOADED_TOKENIZERS) > _REMEMBERED_TOKENIZERS:
            del _LOADED_TOKENIZERS[next(iter(_LOADED_TOKENIZERS))]


_REMEMBERED_TOKENIZERS = 64
_LOADED_LOCK = threading.Lock()
_LOADED_TOKENIZERS: dict[bytes, None] = {}  # insertion-ordered: the oldest goes first


def parse_tokenizer(data: bytes) -> tokenizers.Tokenizer:
    """A new Tokenizer from the bytes of a tokenizer.json; BadValue if they do not load."""
    if not data:
        raise BadValue("'preprocess.tokenizer' is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadValue(f"'preprocess.tokenizer' is not UTF-8 JSON (a tokenizer.json): {e}") from e
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # the library raises plain Exception with serde's message
        message = str(e)
        if len(message) > 300:
            message = message[:300] + "..."
        raise BadValue(
            f"'preprocess.tokenizer' does not load as a tokenizers tokenizer.json: {message}"
        ) from e


def _per_channel(key: str, value: Any, channels: int) -> tuple[float, ...]:
    if _is_number(value):
        value = [value]
    if not isinstance(value, list | tuple):
        raise TypeMismatch(f"'{key}' must be an array of numbers, got {_type_name(value)}")
    numbers = tuple(_expect_number(key, v) for v in value)
    if len(numbers) == 1:
        return numbers * channels
    if len(numbers) != channels:
        raise BadValue(
            f"'{key}' has {len(numbers)} values; expected 1 or {channels} (one per channel)"
        )
    return numbers


def _postprocess(value: Any) -> Postprocess:
    doc = _expect_doc("postprocess", value)
    kind = _expect_str("postprocess.kind", _required(doc, "kind"))
    if kind == "embedding":
        _check_keys("postprocess", doc, {"kind", "pooling", "normalize"})
        pooling = _choice("postprocess.pooling", doc.get("pooling", "none"), POOLINGS)
        normalize = doc.get("normalize", False)
        if not isinstance(normalize, bool):
            raise TypeMismatch(
                f"'postprocess.normalize' must be a boolean, got {_type_name(normalize)}"
            )
        return EmbeddingPostprocess(pooling=pooling, normalize=normalize)  # type: ignore[arg-type]
    if kind == "raw":
        _check_keys("postprocess", doc, {"kind"})
        return RawPostprocess()
    if kind != "classify":
        raise BadValue(
            f"unknown postprocess kind '{kind}': expected 'classify', 'embedding' or 'raw'"
        )
    _check_keys("postprocess", doc, {"kind", "labels", "topK", "softmax"})
    labels_value = _required(doc, "labels")
    if not isinstance(labels_value, list | tuple):
        raise TypeMismatch(f"'postprocess.labels' must be an array, got {_type_name(labels_value)}")
    if not labels_value:
        raise BadValue("'postprocess.labels' may not be empty")
    for label in labels_value:
        if not isinstance(label, str | int) or isinstance(label, bool):
            raise TypeMismatch(
                f"'postprocess.labels' must hold strings or integers, got {_type_name(label)}"
            )
    labels = tuple(labels_value)
    if len(set(labels)) != len(labels):
        raise BadValue("'postprocess.labels' has duplicates")
    top_k = _expect_int("postprocess.topK", doc.get("topK", min(3, len(labels))))
    if top_k < 1 or top_k > len(labels):
        raise BadValue(f"'postprocess.topK' must be in 1..{len(labels)}, got {top_k}")
    softmax = doc.get("softmax", "auto")
    if not isinstance(softmax, bool) and softmax != "auto":
        if isinstance(softmax, str):
            raise BadValue(f"'postprocess.softmax' must be 'auto', true or false, got '{softmax}'")
        raise TypeMismatch(
            f"'postprocess.softmax' must be 'auto' or a boolean, got {_type_name(softmax)}"
        )
    return ClassifyPostprocess(labels=labels, top_k=top_k, softmax=softmax)


def _batch(value: Any) -> BatchPolicy:
    doc = _expect_doc("batch", value)
    _check_keys("batch", doc, {"maxSize", "maxDelayMs"})
    max_size = _expect_int("batch.maxSize", doc.get("maxSize", 64))
    if not 1 <= max_size <= MAX_BATCH_SIZE:
        raise BadValue(f"'batch.maxSize' must be in 1..{MAX_BATCH_SIZE}, got {max_size}")
    max_delay = _expect_number("batch.maxDelayMs", doc.get("maxDelayMs", 2.0))
    if max_delay < 0:
        raise BadValue(f"'batch.maxDelayMs' may not be negative, got {max_delay}")
    return BatchPolicy(max_size=max_size, max_delay_ms=max_delay)

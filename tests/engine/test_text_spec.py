"""Text declarations: preprocess {kind: "text", tokenizer, maxLength} and the embedding
postprocess's pooling/normalize, validated with MongoDB-shaped errors and round-tripped."""

from __future__ import annotations

import json
from typing import Any

import bson
import pytest

from bench.support import text_models
from engine.errors import BadValue, TypeMismatch
from engine.spec import (
    MAX_TEXT_LENGTH,
    EmbeddingPostprocess,
    ModelSpec,
    TextPreprocess,
    check_tokenizer,
)
from proxy.commands.register_model import parse_register_command

TOKENIZER = text_models.tokenizer_json()


def declaration(**fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "t",
        "collection": "db.texts",
        "input": "text",
        "preprocess": {"kind": "text", "tokenizer": TOKENIZER},
        "postprocess": {"kind": "embedding", "pooling": "mean"},
    }
    doc.update(fields)
    return doc


def text_pre(**fields: Any) -> dict[str, Any]:
    return {"kind": "text", "tokenizer": TOKENIZER, **fields}


def test_text_preprocess_defaults() -> None:
    spec = ModelSpec.from_document(declaration())
    assert spec.preprocess == TextPreprocess(tokenizer=TOKENIZER, max_length=256)
    assert spec.postprocess == EmbeddingPostprocess(pooling="mean", normalize=False)


def test_round_trip_through_bson() -> None:
    """What the registry stores (a BSON document) reads back to an equal spec, with the
    tokenizer's bytes intact as BinData."""
    spec = ModelSpec.from_document(
        declaration(
            preprocess=text_pre(maxLength=64),
            postprocess={"kind": "embedding", "pooling": "cls", "normalize": True},
            mode="deferred",
        )
    )
    stored = bson.decode(bson.encode(spec.to_document()))
    assert stored["preprocess"] == {"kind": "text", "tokenizer": TOKENIZER, "maxLength": 64}
    assert isinstance(stored["preprocess"]["tokenizer"], bytes)
    assert ModelSpec.from_document(stored) == spec


def test_binary_and_memoryview_tokenizers_are_taken() -> None:
    for value in (bson.Binary(TOKENIZER), bson.Binary(TOKENIZER, 5), memoryview(TOKENIZER)):
        spec = ModelSpec.from_document(declaration(preprocess=text_pre(tokenizer=value)))
        assert spec.preprocess == TextPreprocess(tokenizer=TOKENIZER)


def test_max_length_bounds_and_doubles() -> None:
    for value, expected in ((1, 1), (MAX_TEXT_LENGTH, MAX_TEXT_LENGTH), (128.0, 128)):
        spec = ModelSpec.from_document(declaration(preprocess=text_pre(maxLength=value)))
        assert isinstance(spec.preprocess, TextPreprocess)
        assert spec.preprocess.max_length == expected


def test_embedding_defaults_keep_old_declarations() -> None:
    spec = ModelSpec.from_document(declaration(postprocess={"kind": "embedding"}))
    assert spec.postprocess == EmbeddingPostprocess()
    assert spec.postprocess.to_document() == {
        "kind": "embedding",
        "pooling": "none",
        "normalize": False,
    }
    for pooling in ("none", "mean", "cls"):
        for normalize in (True, False):
            post = {"kind": "embedding", "pooling": pooling, "normalize": normalize}
            spec = ModelSpec.from_document(declaration(postprocess=post))
            assert spec.postprocess == EmbeddingPostprocess(pooling, normalize)  # type: ignore[arg-type]
            assert ModelSpec.from_document(spec.to_document()) == spec


def test_repr_leaves_out_the_tokenizer() -> None:
    spec = ModelSpec.from_document(declaration())
    assert "tokenizer" not in repr(spec.preprocess)
    assert len(repr(spec)) < 1000


NOT_JSON = b"\xff\xfe not utf-8"


@pytest.mark.parametrize(
    ("preprocess", "error", "message"),
    [
        ({"kind": "text"}, BadValue, "missing required field 'tokenizer'"),
        (text_pre(tokenizer="tokenizer.json"), TypeMismatch, "must be binary data"),
        (text_pre(tokenizer={"model": {}}), TypeMismatch, "must be binary data"),
        (text_pre(tokenizer=b""), BadValue, "'preprocess.tokenizer' is empty"),
        (text_pre(tokenizer=NOT_JSON), BadValue, "is not UTF-8"),
        (text_pre(tokenizer=b"not json at all"), BadValue, "does not load"),
        (text_pre(tokenizer=b"{}"), BadValue, "Model missing"),
        (text_pre(tokenizer=b"[1, 2]"), BadValue, "does not load"),
        (
            text_pre(maxLength=0),
            BadValue,
            f"'preprocess.maxLength' must be in 1..{MAX_TEXT_LENGTH}",
        ),
        (text_pre(maxLength=MAX_TEXT_LENGTH + 1), BadValue, "must be in 1.."),
        (text_pre(maxLength=-5), BadValue, "must be in 1.."),
        (text_pre(maxLength="64"), TypeMismatch, "'preprocess.maxLength' must be an integer"),
        (text_pre(maxLength=1.5), TypeMismatch, "must be an integer"),
        (text_pre(maxLength=True), TypeMismatch, "must be an integer"),
        (text_pre(size=[1, 2]), BadValue, "unknown field 'size'"),
        ({"kind": "txt", "tokenizer": TOKENIZER}, BadValue, "'image', 'tensor' or 'text'"),
    ],
)
def test_text_preprocess_errors(preprocess: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message.replace(".", r"\.").replace("(", r"\(")):
        ModelSpec.from_document(declaration(preprocess=preprocess))


def test_a_broken_tokenizer_json_is_refused_with_the_librarys_reason() -> None:
    broken = json.loads(TOKENIZER)
    broken["model"]["type"] = "NoSuchModel"
    data = json.dumps(broken).encode()
    with pytest.raises(BadValue, match=r"does not load as a tokenizers tokenizer\.json"):
        ModelSpec.from_document(declaration(preprocess=text_pre(tokenizer=data)))
    truncated = TOKENIZER[: len(TOKENIZER) // 2]
    with pytest.raises(BadValue, match="does not load"):
        ModelSpec.from_document(declaration(preprocess=text_pre(tokenizer=truncated)))


def test_long_library_messages_are_cut() -> None:
    with pytest.raises(BadValue) as info:
        check_tokenizer(b'{"model": "' + b"x" * 5000 + b'"}')
    assert len(info.value.message) < 500


def test_checked_tokenizers_are_remembered_but_bad_ones_never() -> None:
    check_tokenizer(TOKENIZER)
    check_tokenizer(TOKENIZER)  # the second time from memory
    for _ in range(2):
        with pytest.raises(BadValue):
            check_tokenizer(b"{}")


@pytest.mark.parametrize(
    ("postprocess", "error", "message"),
    [
        ({"kind": "embedding", "pooling": "max"}, BadValue, "'postprocess.pooling' must be one of"),
        (
            {"kind": "embedding", "pooling": 1},
            TypeMismatch,
            "'postprocess.pooling' must be a string",
        ),
        (
            {"kind": "embedding", "normalize": "yes"},
            TypeMismatch,
            "'postprocess.normalize' must be",
        ),
        ({"kind": "embedding", "normalize": 1}, TypeMismatch, "must be a boolean"),
        ({"kind": "embedding", "labels": ["a"]}, BadValue, "unknown field 'labels'"),
    ],
)
def test_embedding_errors(postprocess: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        ModelSpec.from_document(declaration(postprocess=postprocess))


def test_register_command_refuses_a_tokenizer_that_does_not_load() -> None:
    command = {
        "registerModel": "t",
        "collection": "db.texts",
        "input": "text",
        "onnx": bson.Binary(b"onnx bytes, never read"),
        "preprocess": {"kind": "text", "tokenizer": bson.Binary(b'{"version": "1.0"}')},
        "postprocess": {"kind": "embedding", "pooling": "mean"},
    }
    with pytest.raises(BadValue, match=r"'preprocess\.tokenizer' does not load") as info:
        parse_register_command(command)
    assert (info.value.code, info.value.code_name) == (2, "BadValue")
    command["preprocess"] = {"kind": "text", "tokenizer": bson.Binary(TOKENIZER), "maxLength": 32}
    spec, _ = parse_register_command(command)
    assert spec.preprocess == TextPreprocess(tokenizer=TOKENIZER, max_length=32)

"""Text inputs: the per-item check, and a batch tokenized together (cut at maxLength,
padded on the right to its longest member, not to maxLength)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers

from bench.support import text_models
from engine.errors import PredictionError
from engine.inputs.text import TextEncoder, check_text
from engine.spec import TextPreprocess

TOKENIZER = text_models.tokenizer_json()
INT64 = np.dtype(np.int64)
INPUTS = {"input_ids": INT64, "attention_mask": INT64}


def encoder(
    max_length: int = 256,
    tokenizer: bytes = TOKENIZER,
    inputs: dict[str, np.dtype[Any]] | None = None,
) -> TextEncoder:
    return TextEncoder(TextPreprocess(tokenizer, max_length), inputs or INPUTS)


def library() -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_str(TOKENIZER.decode())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "expected a string, got null"),
        (3, "expected a string, got int"),
        (b"bytes", "expected a string, got bytes"),
        (["a list"], "expected a string, got list"),
        ({"text": "a"}, "expected a string, got dict"),
        ("", "empty or whitespace-only"),
        ("   ", "empty or whitespace-only"),
        ("\n\t \u00a0", "empty or whitespace-only"),
    ],
)
def test_check_text_refuses(value: Any, message: str) -> None:
    with pytest.raises(PredictionError, match=message):
        check_text(value)


def test_check_text_takes_text() -> None:
    assert check_text(" a red shoe ") == " a red shoe "


def test_a_batch_is_padded_to_its_longest_member() -> None:
    texts = ["red shoe", "a small waterproof jacket for travel", "lamp"]
    encoded = encoder().encode(texts)
    alone = [library().encode(text) for text in texts]
    longest = max(len(e.ids) for e in alone)
    assert longest < 256  # not padded to maxLength
    for name in ("input_ids", "attention_mask"):
        assert encoded.feeds[name].shape == (3, longest)
        assert encoded.feeds[name].dtype == np.int64
    for row, single in enumerate(alone):
        n = len(single.ids)
        assert encoded.feeds["input_ids"][row, :n].tolist() == single.ids
        assert encoded.feeds["input_ids"][row, n:].tolist() == [0] * (longest - n)  # [PAD]
        assert encoded.attention_mask[row].tolist() == [1] * n + [0] * (longest - n)
    assert encoded.lengths.tolist() == [len(e.ids) for e in alone]
    assert set(encoded.feeds) == {"input_ids", "attention_mask"}  # as the model declares


def test_truncation_at_max_length_keeps_the_special_tokens() -> None:
    text = " ".join(["red shoe"] * 50)
    encoded = encoder(max_length=8).encode([text, "lamp"])
    assert encoded.feeds["input_ids"].shape == (2, 8)
    ids = encoded.feeds["input_ids"][0].tolist()
    vocab = library().get_vocab()
    assert ids[0] == vocab["[CLS]"] and ids[-1] == vocab["[SEP]"]
    assert ids[1:7] == library().encode(text).ids[1:7]
    assert encoded.lengths.tolist() == [8, 3]


def test_token_type_ids_and_dtypes_follow_the_model() -> None:
    int32 = np.dtype(np.int32)
    inputs: dict[str, np.dtype[Any]] = {
        "input_ids": int32,
        "attention_mask": INT64,
        "token_type_ids": int32,
    }
    encoded = encoder(inputs=inputs).encode(["red shoe", "lamp"])
    assert {name: arr.dtype for name, arr in encoded.feeds.items()} == inputs
    assert encoded.feeds["token_type_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]


def test_the_tokenizer_files_own_padding_and_truncation_are_replaced() -> None:
    """A tokenizer.json may pad to a fixed length and cut elsewhere (all-MiniLM-L6-v2's
    pads to 128): the batch is padded to its longest and cut at maxLength instead."""
    fixed = library()
    fixed.enable_padding(length=128, pad_id=0, pad_token="[PAD]")
    fixed.enable_truncation(max_length=3)
    encoded = encoder(max_length=6, tokenizer=fixed.to_str().encode()).encode(
        ["red shoe", "a small waterproof jacket for travel"]
    )
    assert encoded.feeds["input_ids"].shape == (2, 6)
    assert encoded.lengths.tolist() == [4, 6]


def test_pad_id_comes_from_the_tokenizer() -> None:
    """Without padding settings the pad token is found by its usual names, else id 0."""
    vocab = {"<unk>": 0, "<pad>": 1, "red": 2, "shoe": 3, "lamp": 4}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    encoded = encoder(tokenizer=tok.to_str().encode()).encode(["red shoe", "lamp"])
    assert encoded.feeds["input_ids"].tolist() == [[2, 3], [4, 1]]
    del vocab["<pad>"]
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    encoded = encoder(tokenizer=tok.to_str().encode()).encode(["red shoe", "lamp"])
    assert encoded.feeds["input_ids"].tolist() == [[2, 3], [4, 0]]
    assert encoded.attention_mask.tolist() == [[1, 1], [1, 0]]


def test_texts_without_tokens_have_length_zero_and_can_be_left_out() -> None:
    vocab = {"[UNK]": 0, "red": 1, "shoe": 2}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()  # drops control characters
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text_encoder = encoder(tokenizer=tok.to_str().encode())
    encoded = text_encoder.encode(["red", "\x01\x02", "red shoe shoe"])
    assert encoded.lengths.tolist() == [1, 0, 3]
    kept = text_encoder.select(encoded, np.array([0]))
    assert kept.feeds["input_ids"].tolist() == [[1]]
    assert kept.attention_mask.shape == (1, 1)
    assert text_encoder.encode([]).feeds["input_ids"].shape == (0, 0)


def test_unicode_and_long_texts() -> None:
    texts = ["Überraschung! 日本語のテキスト 🙂", "x" * 100_000]
    encoded = encoder(max_length=16).encode(texts)
    assert encoded.feeds["input_ids"].shape == (2, 16)
    assert encoded.lengths[0] > 2

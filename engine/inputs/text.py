"""Strings -> the named inputs of a text model, a whole batch at once.

A `TextEncoder` belongs to one loaded model version: it holds that version's Tokenizer,
set up once (truncation at maxLength, padding to the batch's longest member, on the
right) and never changed afterwards, so worker threads may share it. `encode` runs in the
worker thread that runs the model, so a batch makes one thread hop for both.

`check_text` is the per-item check made on the event loop before an item joins a batch:
a value that is not a string, or holds no text, fails alone (the model's onError decides
what happens to its document) and never reaches the batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.errors import BadValue, PredictionError
from engine.spec import TextPreprocess, parse_tokenizer

__all__ = [
    "ATTENTION_MASK",
    "INPUT_IDS",
    "TEXT_INPUTS",
    "TOKEN_TYPE_IDS",
    "EncodedTexts",
    "NoTokens",
    "TextEncoder",
    "check_text",
]

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TOKEN_TYPE_IDS = "token_type_ids"
#: The inputs a text model may have: the first two always, the third where declared.
TEXT_INPUTS = (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS)
_PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<PAD>")


class NoTokens(PredictionError):
    """A string the tokenizer turned into no tokens at all (nothing to embed)."""


def check_text(value: Any) -> str:
    """The value as the text to tokenize, or PredictionError (not a string, or no text)."""
    if not isinstance(value, str):
        shown = "null" if value is None else type(value).__name__
        raise PredictionError(f"expected a string, got {shown}")
    if not value or value.isspace():  # isspace: no copy of a long string, unlike strip()
        raise PredictionError("expected text, got an empty or whitespace-only string")
    return value


@dataclass(frozen=True)
class EncodedTexts:
    """A tokenized batch: the model's feeds by name, shaped [n, longest]."""

    feeds: dict[str, np.ndarray]
    attention_mask: np.ndarray  # [n, longest]; 1 for real tokens, 0 for padding
    lengths: np.ndarray  # [n]: real tokens per item (special tokens included)


class TextEncoder:
    """The tokenizer of one model version and the model's text inputs (name -> dtype).
    BadValue if the tokenizer does not load or maxLength leaves no room for text."""

    def __init__(self, pre: TextPreprocess, inputs: Mapping[str, np.dtype[Any]]) -> None:
        self.max_length = pre.max_length
        self.inputs = dict(inputs)
        tokenizer = parse_tokenizer(pre.tokenizer)
        # The tokenizer.json's own settings (e.g. padding to a fixed 128) are replaced:
        # a batch is padded on the right to its longest member, and cut at maxLength.
        padding = tokenizer.padding or {}
        pad_token = padding.get("pad_token")
        pad_id = padding.get("pad_id")
        if pad_token is None or pad_id is None:
            pad_token, pad_id = _pad_token(tokenizer)
        specials = tokenizer.num_special_tokens_to_add(is_pair=False)
        if pre.max_length <= specials:
            # tokenizers would not cut at all: a text could reach any length.
            raise BadValue(
                f"'preprocess.maxLength' {pre.max_length} leaves no room for text: the "
                f"tokenizer adds {specials} special tokens to each text"
            )
        tokenizer.no_truncation()
        tokenizer.enable_truncation(max_length=pre.max_length)
        tokenizer.no_padding()
        tokenizer.enable_padding(
            direction="right",
            pad_id=int(pad_id),
            pad_type_id=int(padding.get("pad_type_id", 0) or 0),
            pad_token=str(pad_token),
        )
        self.tokenizer = tokenizer

    def encode(self, texts: Sequence[str]) -> EncodedTexts:
        """Tokenize the batch together. Raises PredictionError if the tokenizer fails."""
        try:
            encodings = self.tokenizer.encode_batch(list(texts))
        except Exception as e:  # the library raises plain Exception
            raise PredictionError(f"tokenizer failed: {e}") from e
        n = len(encodings)
        longest = len(encodings[0].ids) if n else 0
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(n, longest)
        feeds: dict[str, np.ndarray] = {}
        for name, dtype in self.inputs.items():
            if name == INPUT_IDS:
                values = [e.ids for e in encodings]
            elif name == ATTENTION_MASK:
                feeds[name] = mask.astype(dtype, copy=False)
                continue
            else:
                values = [e.type_ids for e in encodings]
            feeds[name] = np.array(values, dtype=dtype).reshape(n, longest)
        return EncodedTexts(feeds=feeds, attention_mask=mask, lengths=mask.sum(axis=1))

    def select(self, encoded: EncodedTexts, keep: np.ndarray) -> EncodedTexts:
        """The items at `keep` (indices), trimmed to the longest of them."""
        longest = int(encoded.lengths[keep].max()) if len(keep) else 0
        feeds = {name: arr[keep, :longest] for name, arr in encoded.feeds.items()}
        mask = encoded.attention_mask[keep, :longest]
        return EncodedTexts(feeds=feeds, attention_mask=mask, lengths=encoded.lengths[keep])


def _pad_token(tokenizer: Any) -> tuple[str, int]:
    """The pad token of a tokenizer.json without padding settings: a usual name, else id 0
    (padded positions are masked out, so the id matters only to models that ignore the mask)."""
    for token in _PAD_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token, int(token_id)
    token = tokenizer.id_to_token(0)
    return (token if token is not None else "[PAD]"), 0

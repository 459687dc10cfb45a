"""`modelgate demo`: its two stories as a user runs them, end to end: `--story images
--size small` (train from a query, attach, classify new users) and `--story search`
(MiniLM registered, an autoEmbed index on the product catalogue, questions by meaning)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from bench.support.processes import ROOT
from modelgate.demo_search import missing
from modelgate.demo_texts import CATEGORIES, QUERIES, products

pytest.importorskip("torch", reason="needs the train extra (torch)")
pytest.importorskip("sklearn", reason="needs the train extra (scikit-learn)")

pytestmark = pytest.mark.train

PREDICTION = re.compile(
    r"^\s+(user-\d+)\s+(\d)\s+(\d) \((0\.\d\d|1\.00)\)\s+(\d) \((0\.\d\d|1\.00)\)", re.M
)


# "      0.760  Eco travel mug (black)    kitchen   143.85"
FOUND = re.compile(r"^ {6}(0\.\d{3}|1\.000)  (.+?) +(\w+) +(\d+\.\d\d)$", re.M)
QUESTION = re.compile(r'^ {4}"(.+)"$', re.M)


def demo(*args: str, timeout: float) -> str:
    """`modelgate demo ARGS`' output, once it has exited with status 0."""
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "demo", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = result.stdout
    assert result.returncode == 0, output + result.stderr[-3000:]
    assert re.search(r"^total [\d.]+s: OK$", output, re.M), output
    return output


def test_demo_small_predicts_new_users() -> None:
    output = demo("--story", "images", "--size", "small", timeout=170)

    rows = PREDICTION.findall(output)
    assert len(rows) == 5, output
    assert all(inline == deferred for _, _, inline, _, deferred, _ in rows), output
    right = sum(truth == deferred for _, truth, _, _, deferred, _ in rows)
    assert right >= 3, output  # most of them

    accuracy = re.search(r"validation accuracy: (0\.\d+|1\.0+)", output)
    assert accuracy is not None, output
    assert float(accuracy.group(1)) >= 0.85, output
    backfill = re.search(r"backfilled (\d+)/(\d+) users \((\d+) right\)", output)
    assert backfill is not None and backfill.group(1) == backfill.group(2) == "40", output
    assert int(backfill.group(3)) >= 32, output
    assert "[7]" not in output  # the images story alone


@pytest.mark.skipif(missing() is not None, reason=f"the search story needs {missing()}")
def test_demo_search_answers_questions_by_meaning() -> None:
    output = demo("--story", "search", timeout=300)
    catalogue = products()
    assert "'minilm' v1: 384 dimensions, mean pooling, normalized" in output, output
    assert f"index 'semantic' READY: {len(catalogue)} descriptions embedded" in output, output

    # Each question, then its three products, best first, with MongoDB's cosine scores.
    questions = QUESTION.findall(output)
    assert questions == [q for q, _ in QUERIES] + ["a present for a small child"], output
    rows = FOUND.findall(output)
    assert len(rows) == 3 * len(questions), output
    names = {doc["name"]: doc for doc in catalogue}
    for score, name, category, price in rows:
        assert names[name]["category"] == category and category in CATEGORIES, output
        assert f"{names[name]['price']:.2f}" == price, output
        assert 0.5 < float(score) <= 1.0, output
    for k in range(len(questions)):
        scores = [float(score) for score, *_ in rows[3 * k : 3 * k + 3]]
        assert scores == sorted(scores, reverse=True), output
    firsts = [rows[3 * k][2] for k in range(len(QUERIES))]
    assert sum(got == want for got, (_, want) in zip(firsts, QUERIES, strict=True)) >= 4, output
    assert all(c == "toys" and float(p) < 30 for _, _, c, p in rows[-3:]), output
    assert re.search(r"3 products, all toys under 30: True", output), output

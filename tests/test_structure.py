"""The shape of the codebase, enforced where CI runs: which package may import which,
how large a module may grow, and how much code is written twice.

The import contract (README, "Layout"): `proxy/wire` is a pure codec (nothing of the
project, no I/O); `engine` is the serving core and knows nothing of the wire front, the
client, the benchmarks or the tests; `modelgate`, the client, never reaches into the
server's wire front; `proxy` never needs `bench` or `tests` to start; `bench` never
imports `tests`, so that every benchmark runs from an installed wheel."""

from __future__ import annotations

import ast
import io
import keyword
import tokenize
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.support.processes import ROOT

PACKAGES = ("modelgate", "proxy", "engine", "bench")
PROJECT = (*PACKAGES, "tests")

# Modules that do I/O, keep time or log: none of them belongs in a sans-I/O codec.
IO_MODULES = frozenset(
    {
        "asyncio",
        "httpx",
        "lmdb",
        "logging",
        "onnxruntime",
        "os",
        "pymongo",
        "selectors",
        "socket",
        "ssl",
        "subprocess",
        "threading",
        "time",
        "trio",
    }
)

# (importer prefix, imported top-level names it must never reach, module level only?)
FORBIDDEN: list[tuple[str, frozenset[str], bool]] = [
    ("engine", frozenset({"proxy", "bench", "tests", "modelgate"}), False),
    ("modelgate", frozenset({"proxy", "bench", "tests"}), False),
    ("proxy", frozenset({"bench", "tests"}), True),
    ("bench", frozenset({"tests"}), False),
]

MAX_MODULE_LINES = 600
MAX_REPEATED_PAIRS = 5
REPEAT_LINES = 6
# A run of shapes found in more places than this is an idiom (a field list, a table); a
# run with fewer distinct lines, or fewer lines that decide or compute something, is a
# declaration (a signature, a call's keyword arguments), too thin to be logic to share.
MAX_PLACES = 8
MIN_DISTINCT_LINES = 3
MIN_LOGIC_LINES = 2
LOGIC = frozenset(
    {"if", "elif", "else", "for", "while", "return", "raise", "try", "except", "with", "yield"}
    | {"await", "and", "or", "not", "in", "is", "+", "-", "*", "/", "//", "%", "&", "|", "^"}
    | {"<", ">", "<=", ">=", "==", "!=", "+=", "-=", "<<", ">>"}
)


def _modules(*roots: str) -> Iterator[tuple[str, Path]]:
    for root in roots:
        for path in sorted((ROOT / root).rglob("*.py")):
            relative = path.relative_to(ROOT).with_suffix("")
            yield ".".join(relative.parts), path


def _imports(path: Path) -> Iterator[tuple[str, bool]]:
    """Every module `path` imports, and whether the import runs at module level."""
    tree = ast.parse(path.read_text(), str(path))
    module_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in module_level
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module, id(node) in module_level


def _top(module: str) -> str:
    return module.split(".", 1)[0]


@pytest.mark.parametrize("rule", FORBIDDEN, ids=[rule[0] for rule in FORBIDDEN])
def test_import_contract(rule: tuple[str, frozenset[str], bool]) -> None:
    importer, forbidden, module_level_only = rule
    broken = [
        f"{name} imports {imported}"
        for name, path in _modules(importer)
        for imported, at_module_level in _imports(path)
        if _top(imported) in forbidden and (at_module_level or not module_level_only)
    ]
    assert not broken, "\n".join(broken)


def test_wire_codec_is_pure() -> None:
    broken = [
        f"{name} imports {imported}"
        for name, path in _modules("proxy/wire")
        for imported, _ in _imports(path)
        if _top(imported) in IO_MODULES
        or (_top(imported) in PROJECT and not imported.startswith("proxy.wire"))
    ]
    assert not broken, "\n".join(broken)


def test_modules_stay_small() -> None:
    large = [
        f"{name}: {lines} lines"
        for name, path in _modules("proxy", "engine", "modelgate")
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not large, "\n".join(large)


# -- repeated blocks ------------------------------------------------------------------


def _shapes(path: Path) -> list[tuple[int, str]]:
    """Each logical line of code that says something, as (line number, shape): names,
    strings and numbers replaced by placeholders, keywords and operators kept. Blank
    lines, comments, imports, docstrings and lines of lone punctuation are left out, as
    they carry no logic to share."""
    lines: dict[int, list[str]] = defaultdict(list)
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    for token in tokens:
        if token.type == tokenize.NAME:
            text = token.string if keyword.iskeyword(token.string) else "N"
        elif token.type == tokenize.STRING:
            text = "S"
        elif token.type == tokenize.NUMBER:
            text = "0"
        elif token.type == tokenize.OP:
            text = token.string
        else:
            continue
        lines[token.start[0]].append(text)
    shapes = []
    for number, parts in sorted(lines.items()):
        if parts[0] in ("import", "from") or parts == ["S"]:
            continue
        if all(not (part == "N" or keyword.iskeyword(part)) for part in parts):
            continue
        shapes.append((number, " ".join(parts)))
    return shapes


def repeated_pairs(roots: tuple[str, ...]) -> list[str]:
    """Pairs of modules (a module may pair with itself) that share a run of REPEAT_LINES
    or more lines of the same shape; each pair counts once, however many runs it shares."""
    windows: dict[tuple[str, ...], list[tuple[str, int]]] = defaultdict(list)
    for name, path in _modules(*roots):
        shapes = _shapes(path)
        for start in range(len(shapes) - REPEAT_LINES + 1):
            window = tuple(shape for _, shape in shapes[start : start + REPEAT_LINES])
            windows[window].append((name, start))
    pairs: dict[tuple[str, str], int] = {}
    for window, places in windows.items():
        if (
            len(places) > MAX_PLACES
            or len(set(window)) < MIN_DISTINCT_LINES
            or sum(not LOGIC.isdisjoint(shape.split()) for shape in window) < MIN_LOGIC_LINES
        ):
            continue
        for i, (first, first_start) in enumerate(places):
            for second, second_start in places[i + 1 :]:
                if first == second and second_start - first_start < REPEAT_LINES:
                    continue  # one run overlapping itself, not two places
                pairs.setdefault((first, second), first_start)
    return sorted(f"{first} ~ {second}" for first, second in pairs)


def test_little_code_is_written_twice() -> None:
    pairs = repeated_pairs(PACKAGES)
    assert len(pairs) <= MAX_REPEATED_PAIRS, "\n".join(pairs)

"""The house rules a reader relies on, checked on the source text: each file is a chapter that only
looks back (imports earlier chapters only, not even inside a function), every function fits in a
reader's head, each chapter and each of its longer definitions says what it is for, and comments say
why, not how fast (measurements live in docs/ with the commands that made them)."""
import ast
import io
import os
import re
import tokenize

import pytest

from conftest import ROOT

CHAPTERS = ["data", "eval", "collab", "collm", "train"]  # the ladder: each imports only those before it
TOOLS = sorted(f"tools/{f[:-3]}" for f in os.listdir(os.path.join(ROOT, "tools")) if f.endswith(".py"))
MAX_FUNCTION_LINES = 70
EXPLAIN_FROM = 10  # a definition this long or longer opens with a docstring


MAX_CHAPTER_LINES = 2800  # the five chapters together: what a newcomer reads in an evening


def source(module):
    with open(os.path.join(ROOT, f"{module}.py"), encoding="utf-8") as f:
        return f.read()


def imported_modules(tree):
    """Every top-level module name an import statement anywhere in the file names."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("module", CHAPTERS)
def test_each_chapter_imports_only_earlier_chapters(module):
    ours = set(imported_modules(ast.parse(source(module)))) & set(CHAPTERS)
    later = sorted(ours - set(CHAPTERS[:CHAPTERS.index(module)]), key=CHAPTERS.index)
    assert not later, f"{module}.py imports {later}: a chapter may only import the ones before it"


@pytest.mark.parametrize("tool", TOOLS)
def test_tools_import_the_chapters_and_no_chapter_imports_a_tool(tool):
    """tools/ stands beside the chapters: a tool may import chapters (and other tools), a chapter never
    imports a tool, so the five chapters read and run without the folder."""
    assert not any(m == "tools" for c in CHAPTERS for m in imported_modules(ast.parse(source(c))))
    assert set(imported_modules(ast.parse(source(tool)))) & set(CHAPTERS), f"{tool}.py uses no chapter"


def test_the_five_chapters_fit_their_budget():
    lines = {c: source(c).count("\n") for c in CHAPTERS}
    assert sum(lines.values()) <= MAX_CHAPTER_LINES, lines


@pytest.mark.parametrize("module", CHAPTERS + TOOLS)
def test_every_function_is_under_70_lines(module):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(source(module)))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 >= MAX_FUNCTION_LINES]
    assert not long, f"{module}.py: {', '.join(long)}"


def docstring(node):
    body = getattr(node, "body", None)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0].value.value
    return None


@pytest.mark.parametrize("module", CHAPTERS + TOOLS)
def test_each_chapter_opens_with_what_it_is(module):
    doc = docstring(ast.parse(source(module)))
    assert doc and doc.startswith(f"{module}.py: "), f"{module}.py: no opening docstring naming the chapter"


@pytest.mark.parametrize("module", CHAPTERS + TOOLS)
def test_every_longer_definition_says_what_it_is_for(module):
    """A class or function of EXPLAIN_FROM lines or more opens with a docstring. Not a rule on how much
    is commented (a share of comment lines rewards volume), but on where a reader can always find the
    purpose. Exempt: __init__ (its class says it) and a CLI's main / parse_* (their --help says it)."""
    bare = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(source(module)))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and node.end_lineno - node.lineno + 1 >= EXPLAIN_FROM and docstring(node) is None
            and node.name != "__init__" and node.name != "main" and not node.name.startswith("parse_")]
    assert not bare, f"{module}.py: no docstring on {', '.join(bare)}"


# A measured figure: a rate, a duration, a speed-up, a four-decimal AUC. They go stale as the code and
# the machines change, so they live in docs/ beside the commands that measured them, and tools/bench.py,
# which measures, is the one file that may speak of them.
FIGURE = re.compile(r"\d\s*(samples|rows|tokens|steps)/s\b|[GT]FLOP/s|\b\d+(\.\d+)?\s?(ms|s|seconds|minutes)\b"
                    r"|\d(\.\d+)?x (faster|slower)|~\d+(\.\d+)?x\b|\b0\.\d{4}\b")


def explanations(text):
    """(line number, text) of every comment and every docstring line."""
    lines = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(text).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        doc = docstring(node) if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) else None
        if doc is not None:
            lines += [(node.body[0].lineno + i, line) for i, line in enumerate(doc.splitlines())]
    return lines


@pytest.mark.parametrize("module", [m for m in CHAPTERS + TOOLS if m != "tools/bench"])
def test_comments_hold_no_measurements(module):
    found = [f"{n}: {line.strip()}" for n, line in explanations(source(module)) if FIGURE.search(line)]
    assert not found, f"{module}.py: " + " | ".join(found)


def test_the_figure_pattern_finds_measurements_and_leaves_settings_alone():
    measured = ["about 1.3x faster (2.7-2.9 s instead of 3.5-4.0 s)", "LoRA steps 3.40 vs 2.96 samples/s",
                "0.3 GFLOP/s against 142", "valid 0.7108", "~20x faster", "once (about 15 s)"]
    settings = ["lr 1e-3, wd 1e-4", "N(0, 0.1) init", "(B, T, H)", "the last 10 liked items", "13 GB of weights"]
    assert all(FIGURE.search(t) for t in measured) and not any(FIGURE.search(t) for t in settings)


TEST_FILES = [f[:-3] for f in sorted(os.listdir(os.path.join(ROOT, "tests"))) if f.endswith(".py")]
UNCITABLE = "SP" + "EC"  # a design file of an early draft, never in the repository (spelled so, to not match here)


@pytest.mark.parametrize("module", CHAPTERS + TOOLS + [f"tests/{t}" for t in TEST_FILES])
def test_comments_cite_what_a_reader_can_open(module):
    """Comments cite the paper, the README or the reference's files, never a document that a reader
    of the repository cannot open."""
    assert UNCITABLE not in source(module)


@pytest.mark.parametrize("test_file", [t for t in TEST_FILES if t.startswith("test_")])
def test_no_test_file_imports_another(test_file):
    """Shared test helpers live in conftest.py; a test file importing another runs its fixtures twice
    and ties the two together."""
    imported = set(imported_modules(ast.parse(source(f"tests/{test_file}"))))
    assert not {t for t in TEST_FILES if t.startswith("test_")} & imported

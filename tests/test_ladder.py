"""The house rules a reader relies on, checked on the source text: each file is a chapter that only
looks back (imports earlier chapters only, not even inside a function), every function fits in a
reader's head, and each chapter explains itself (comment and docstring lines)."""
import ast
import io
import os
import tokenize

import pytest

from conftest import ROOT

CHAPTERS = ["prepare", "data", "eval", "collab", "backbone", "collm", "checkpoint", "train", "bench"]  # the README's reading order
MAX_FUNCTION_LINES = 70
COMMENT_SHARE = (0.20, 0.45)  # heavily commented is the design; past 45% the code drowns


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


@pytest.mark.parametrize("module", CHAPTERS)
def test_every_function_is_under_70_lines(module):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(source(module)))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 >= MAX_FUNCTION_LINES]
    assert not long, f"{module}.py: {', '.join(long)}"


def comment_share(text):
    """Share of non-blank lines that hold a comment or belong to a docstring (module, class, function)."""
    lines = {n for n, line in enumerate(text.splitlines(), 1) if line.strip()}
    explained = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(text).readline)
                 if tok.type == tokenize.COMMENT}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body \
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) \
                and isinstance(node.body[0].value.value, str):
            explained.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    return len(lines & explained) / len(lines)


@pytest.mark.parametrize("module", CHAPTERS)
def test_each_chapter_explains_itself(module):
    share = comment_share(source(module))
    assert COMMENT_SHARE[0] <= share <= COMMENT_SHARE[1], f"{module}.py: {share:.1%} comment and docstring lines"


def test_comment_share_counts_comments_and_docstrings():
    text = '"""doc\nstring"""\nx = 1  # why\n\ny = 2\n\n\ndef f():\n    """one"""\n    return 3\n'
    assert comment_share(text) == pytest.approx(4 / 7)  # doc, string, x, one of: +y, def, return


TEST_FILES = [f[:-3] for f in sorted(os.listdir(os.path.join(ROOT, "tests"))) if f.endswith(".py")]
UNCITABLE = "SP" + "EC"  # a design file of an early draft, never in the repository (spelled so, to not match here)


@pytest.mark.parametrize("module", CHAPTERS + [f"tests/{t}" for t in TEST_FILES])
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

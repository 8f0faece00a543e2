"""Every pointer the prose gives is true: a `module.name` that a docstring or comment names exists, a
"docs/paper.md §N" (and "pitfall N") resolves, a file a docstring or page names exists, and the README's file table
gives the real line counts. A renamed function, a moved section or a file that grew is caught here, not by a
reader."""

import ast
import importlib
import io
import re
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))  # the project's flat modules
FOLDERS = ("tools", "benchmarks", "experiments", "tests")
NAMED = re.compile(r"(?<![\w./])(" + "|".join(MODULES) + r")\.([A-Za-z_][A-Za-z0-9_]*)")
FILE_SUFFIXES = {"py", "md", "lock", "json", "jsonl", "pt", "log", "txt", "png", "sh", "gz", "old", "tmp"}  # files
SECTION = re.compile(r"docs/paper\.md §(\d+(?:\.\d+)?)")
PITFALL = re.compile(r"docs/paper\.md pitfalls? (\d+)(?: and (\d+))?")
SOURCES = [ROOT / f"{m}.py" for m in MODULES] + [p for f in FOLDERS for p in sorted((ROOT / f).glob("*.py"))]


def prose(path: Path) -> str:
    """The docstrings and comments of a Python file."""
    source = path.read_text()
    parts = [ast.get_docstring(node, clean=False) or "" for node in ast.walk(ast.parse(source))
             if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    parts += [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    return "\n".join(parts)


def paper_sections() -> set[str]:
    """The section numbers of docs/paper.md's headings ("## 3. ...", "### 1.2 ...")."""
    text = (ROOT / "docs" / "paper.md").read_text()
    return {m.group(1) for m in re.finditer(r"^#+ (\d+(?:\.\d+)?)\.? ", text, re.MULTILINE)}


def pitfalls() -> int:
    """How many numbered pitfalls docs/paper.md §7 lists."""
    text = (ROOT / "docs" / "paper.md").read_text().split("## 7.")[1].split("\n## ")[0]
    return len(re.findall(r"^(\d+)\. ", text, re.MULTILINE))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_name_the_prose_gives_exists(path):
    sys.path.insert(0, str(ROOT))
    missing = []
    for module, name in set(NAMED.findall(prose(path))):
        if name in FILE_SUFFIXES:
            continue
        if not hasattr(importlib.import_module(module), name):
            missing.append(f"{module}.{name}")
    assert not missing, f"{path.name} names what does not exist: {sorted(missing)}"


def test_every_docs_paper_section_and_pitfall_cited_exists():
    sections, count = paper_sections(), pitfalls()
    assert {"1.1", "1.2", "1.3", "2.1", "3", "4.5", "7", "9"} <= sections and count == 16
    texts = {p: prose(p) for p in SOURCES} | {p: p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob(
        "*.md")]}
    bad = [f"{p.relative_to(ROOT)}: §{s}" for p, text in texts.items() for s in SECTION.findall(text)
           if s not in sections]
    bad += [f"{p.relative_to(ROOT)}: pitfall {n}" for p, text in texts.items() for pair in PITFALL.findall(text)
            for n in pair if n and not 1 <= int(n) <= count]
    assert not bad, bad


def test_every_file_the_prose_names_exists():
    cited = re.compile(r"\b((?:docs|tests|tools|benchmarks|experiments|data)/[\w./-]+\.(?:py|md|sh|png|json))")
    texts = {p: prose(p) for p in SOURCES} | {p: p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob(
        "*.md")]}
    missing = sorted({f"{p.relative_to(ROOT)}: {f}" for p, text in texts.items() for f in cited.findall(text)
                      if "*" not in f and "{" not in f and not (ROOT / f.rstrip(".")).exists()})
    assert not missing, missing


def test_the_readme_file_table_gives_the_real_line_counts():
    rows = re.findall(r"^\| `([\w.]+\.py)` \| ([\d,]+) \|", (ROOT / "README.md").read_text(), re.MULTILINE)
    assert len(rows) >= 10
    wrong = {f: (int(n.replace(",", "")), len((ROOT / f).read_text().splitlines())) for f, n in rows
             if int(n.replace(",", "")) != len((ROOT / f).read_text().splitlines())}
    assert not wrong, f"README says / file has: {wrong}"

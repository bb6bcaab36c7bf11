"""The user docs point only inside the repository, and every test they name exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")
OUTSIDE = re.compile(r"REFERENCES\.md|\.\./shared|/work/|DESIGN\.md")
NOT_TESTS = {"test_fraction", "test_count"}  # fine-tuning settings, not tests
NAMED_TEST = re.compile(r"(tests/test_\w+\.py)(?:::(\w+)(?:::(\w+))?)?")


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped, spaces as -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    return {anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def test_links_stay_inside_the_repository_and_resolve() -> None:
    bad = []
    for md in DOCS:
        text = md.read_text()
        bad += [f"{md.name}: mentions {m.group(0)}" for m in OUTSIDE.finditer(text)]
        for target in LINK.findall(text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            path, _, frag = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.is_relative_to(ROOT) or not dest.exists():
                bad.append(f"{md.name}: link {target} leaves the repository or is missing")
            elif frag and dest.suffix == ".md" and frag not in anchors(dest):
                bad.append(f"{md.name}: link {target} has no such heading")
    assert not bad, "\n".join(bad)


def _defined(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            names |= {f"{node.name}::{n.name}" for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


def test_every_test_the_docs_name_exists() -> None:
    missing = []
    for md in DOCS:
        for m in NAMED_TEST.finditer(md.read_text()):
            path = ROOT / m.group(1)
            if not path.exists():
                missing.append(f"{md.name}: {m.group(0)} (no such file)")
                continue
            name = "::".join(n for n in m.group(2, 3) if n)
            if name and name not in _defined(path):
                missing.append(f"{md.name}: {m.group(0)} (no such test)")
    assert not missing, "\n".join(missing)


def test_every_bare_test_name_in_the_docs_is_defined_somewhere() -> None:
    files = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    defined: set[str] = set()
    for p in (ROOT / "tests").glob("test_*.py"):
        defined |= {n.split("::")[-1] for n in _defined(p)}
    missing = []
    for md in DOCS:
        text = md.read_text()
        missing += [f"{md.name}: {f}" for f in re.findall(r"\b(test_\w+\.py)\b", text) if f not in files]
        missing += [f"{md.name}: {n}" for n in re.findall(r"\b(test_\w+)\b(?!\.py)", text) if n not in defined | NOT_TESTS and n not in {p[:-3] for p in files}]
    assert not missing, "\n".join(missing)


def test_every_short_test_reference_is_in_the_file_named_before_it() -> None:
    """A ``::test_x`` after ``tests/test_f.py`` in the same doc means ``tests/test_f.py::test_x``."""
    short = re.compile(r"(?<![\w.])::(\w+)")
    wrong = []
    for md in DOCS:
        text = md.read_text()
        for m in short.finditer(text):
            before = list(NAMED_TEST.finditer(text, 0, m.start()))
            if not before:
                wrong.append(f"{md.name}: ::{m.group(1)} names no file before it")
                continue
            path = ROOT / before[-1].group(1)
            if m.group(1) not in {n.split("::")[-1] for n in _defined(path)}:
                wrong.append(f"{md.name}: ::{m.group(1)} is not in {before[-1].group(1)}, the file named before it")
    assert not wrong, "\n".join(wrong)

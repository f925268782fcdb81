"""The documentation is self-contained.

1. No source or documentation file names a document that is not in the repository
   (design notes that lived outside it, or a sibling "shared" folder).
2. Every section cited as `docs/theory.md §N` (or `docs/references.md §N`) exists as a
   numbered heading of that page.

Both checks are run on planted text too, so a broken pattern cannot pass silently.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED_SUFFIXES = (".py", ".md", ".toml", ".cfg", ".txt", ".rst", ".yml", ".yaml")
SKIPPED_DIRS = {"__pycache__", "report", "build", "dist", "node_modules"}

# Built by concatenation so that this file does not name them itself.
_OUTSIDE_DOCS = ["THE" + "ORY", "PRO" + "DUCT", "REFER" + "ENCES", "ST" + "YLE",
                 "DEVEL" + "OPERS"]
_OUTSIDE_PATHS = ["../" + "shared", "/work/" + "shared"]


def _skip_dir(name: str) -> bool:
    return name.startswith(".") or name.endswith(".egg-info") or name in SKIPPED_DIRS


def repository_files(root: Path = ROOT) -> list[Path]:
    """Text files of the repository (no virtual env, git data, caches or outputs)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skip_dir(d))
        out += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(SCANNED_SUFFIXES)]
    return out


def missing_document_patterns(present_names: set[str]) -> list[re.Pattern]:
    """Patterns for documents that a file may not cite because the repository lacks them.

    `NAME.md` for each outside design note absent from the repository, the bare
    upper-case word `NAME` used as a citation (e.g. "NAME §3", "NAME "Bulk laws""; not
    an identifier such as `NAME = …` or `x.NAME(…)`), and paths into a sibling shared
    folder.
    """
    pats = []
    for name in _OUTSIDE_DOCS:
        if f"{name}.md" in present_names:
            continue
        pats.append(re.compile(r"(?<![\w/])" + name + r"\.md\b"))
        pats.append(re.compile(r"(?<![\w/.])" + name + r"(?![\w.(\[]|\s*=)"))
    pats += [re.compile(re.escape(p)) for p in _OUTSIDE_PATHS]
    return pats


def find_missing_citations(text: str, patterns) -> list[str]:
    return [f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
            for pat in patterns for m in pat.finditer(text)]


def section_ids(markdown: str) -> set[str]:
    """Numbers of the numbered headings ('## 3. …' → '3', '### 3.6 …' → '3.6')."""
    return set(re.findall(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s", markdown, flags=re.MULTILINE))


_SECTION_REF = re.compile(r"§\s*(\d+(?:\.\d+)*)(?:\s*[–—-]\s*§?\s*(\d+(?:\.\d+)*))?")


def cited_sections(text: str, doc: str) -> list[str]:
    """Section numbers cited right after `doc` (up to the end of the parenthesis/line,
    or the next citation of another document). Ranges '§2–§3' give both ends."""
    out = []
    for m in re.finditer(re.escape(doc), text):
        tail = re.split(r"[)\n]|docs/\w+\.md", text[m.end():m.end() + 200], maxsplit=1)[0]
        for a, b in _SECTION_REF.findall(tail):
            out += [a] + ([b] if b else [])
    return out


# --------------------------------------------------------------------------- tests

def test_docs_pages_exist():
    for page in ("theory.md", "references.md"):
        assert (ROOT / "docs" / page).is_file(), f"docs/{page} is missing"


def test_detector_catches_planted_citations():
    pats = missing_document_patterns(present_names=set())
    planted = {
        _OUTSIDE_DOCS[0] + ".md §3": 1,
        "(see " + _OUTSIDE_DOCS[2] + " \"Bulk laws\")": 1,
        "the " + _OUTSIDE_DOCS[0] + " §2 form": 1,
        "(the " + _OUTSIDE_DOCS[2] + " warning)": 1,
        _OUTSIDE_DOCS[3] + " = {}; x." + _OUTSIDE_DOCS[3] + "(1)": 0,
        _OUTSIDE_PATHS[0] + "/notes": 1,
        _OUTSIDE_DOCS[1] + ".md": 1,
        "docs/theory.md §3 and docs/references.md §2": 0,
        "THEORY_CONSTANT = 1; theory.md": 0,
    }
    for text, expected in planted.items():
        assert len(find_missing_citations(text, pats)) == expected, text
    # a document that does exist in the repository may be cited
    allowed = missing_document_patterns(present_names={_OUTSIDE_DOCS[4] + ".md"})
    assert find_missing_citations(_OUTSIDE_DOCS[4] + ".md", allowed) == []


def test_no_citation_of_documents_outside_the_repository():
    files = repository_files()
    assert len(files) > 20 and any(p.name == "lr.py" for p in files)   # the scan sees the code
    pats = missing_document_patterns({p.name for p in files})
    bad = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        bad += [f"{path.relative_to(ROOT)} {hit}" for hit in find_missing_citations(text, pats)]
    assert not bad, "citations of documents not in the repository:\n" + "\n".join(bad)


def test_section_parsers_on_planted_text():
    page = "# T\n## 1. A\n## 2. B\n### 2.1 C\n## 3. D\n"
    assert section_ids(page) == {"1", "2", "2.1", "3"}
    text = ("x (docs/theory.md §2–§3) y docs/theory.md §1, §2.1 [ext]\n"
            "z (docs/theory.md §6–7, docs/references.md §9)")
    assert cited_sections(text, "docs/theory.md") == ["2", "3", "1", "2.1", "6", "7"]
    assert cited_sections(text, "docs/references.md") == ["9"]
    assert set(cited_sections(text, "docs/theory.md")) - section_ids(page) == {"6", "7"}


@pytest.mark.parametrize("doc", ["docs/theory.md", "docs/references.md"])
def test_every_cited_section_exists(doc):
    ids = section_ids((ROOT / doc).read_text(encoding="utf-8"))
    assert {"1", "2", "3"} <= ids
    cited, bad = 0, []
    for path in repository_files():
        if path == Path(__file__).resolve():
            continue   # the planted examples above
        text = path.read_text(encoding="utf-8", errors="replace")
        for sec in cited_sections(text, doc):
            cited += 1
            if sec not in ids:
                bad.append(f"{path.relative_to(ROOT)}: {doc} §{sec}")
    assert not bad, f"sections cited but absent from {doc}:\n" + "\n".join(bad)
    if doc == "docs/theory.md":
        assert cited > 20   # the code does cite the theory page


def test_theory_keeps_the_cited_section_titles():
    """Citations name sections by number and, in places, by a phrase of the section."""
    theory = (ROOT / "docs" / "theory.md").read_text(encoding="utf-8")
    headings = dict(re.findall(r"^#{2,3}\s+(\d+(?:\.\d+)*)\.?\s+(.*)$", theory, re.MULTILINE))
    assert headings["1"].startswith("Objects")
    assert "spiked Wigner" in headings["2"]
    assert "Field-dependent" in headings["3"]
    assert "GGN" in headings["4"]
    assert "Learning rates" in headings["5"]
    assert "on-the-fly learner" in headings["6"]
    for phrase in ("Mean-square stability", "Adam / adaptive", "Damping", "measure"):
        assert phrase in re.split(r"^## [56]\.", theory, flags=re.MULTILINE)[1], phrase


def test_every_exported_name_is_documented():
    """Every name `nets` and `rmt` export (`__all__`) is named in the README or docs/api.md
    as code (`name`, `name(...)`, `pkg.name`, `pkg.name[...]`): six exports had no line
    anywhere (an outside check), and `nets.gradient_noise`, documented, was missing from
    `__all__`."""
    import nets
    import rmt

    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "api.md").read_text()
    missing = [f"{pkg.__name__}.{name}" for pkg in (nets, rmt) for name in pkg.__all__
               if not re.search(rf"`(?:[\w.]+\.)?{re.escape(name)}[`(\[.]", text)]
    assert not missing, f"exported but not documented: {missing}"
    assert "gradient_noise" in nets.__all__ and callable(nets.gradient_noise)

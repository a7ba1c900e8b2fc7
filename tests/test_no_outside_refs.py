"""The project cites only its own documents: no ``../shared`` notes, every ``docs/algorithms.md#anchor`` resolves.

Users get the repository (or the sdist), never the notes the project was started from, so a
citation of ``../shared/ALGORITHMS.md`` or ``DESIGN.md`` points nowhere; the equations live in
docs/algorithms.md and the architecture in docs/design.md.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("README.md", "docs", "precond", "recipes", "tests", "bench")
TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".json", ".toml", ".txt", ".rst", ".cfg", ".ini", ""}
FORBIDDEN = re.compile(r"\.\./shared|ALGORITHMS\.md|DESIGN\.md")
CITATION = re.compile(r"docs/algorithms\.md#([A-Za-z0-9_\-]+)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
THIS = Path(__file__).resolve()


def _files() -> list[Path]:
    """The repository's text files under ``SCANNED``: tracked or new (not ignored) when git knows the
    tree, else every file found there (an unpacked sdist)."""
    paths: list[Path] = []
    git = shutil.which("git")
    listed = None
    if git is not None and (ROOT / ".git").exists():
        try:
            out = subprocess.run(
                [git, "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", *SCANNED],
                cwd=ROOT, capture_output=True, check=True,
            ).stdout
            listed = [ROOT / p for p in out.decode("utf-8").split("\0") if p]
        except (OSError, subprocess.CalledProcessError):
            listed = None
    if listed is None:
        listed = []
        for name in SCANNED:
            top = ROOT / name
            listed.extend([top] if top.is_file() else (p for p in top.rglob("*") if p.is_file()))
    for p in listed:
        if not p.is_file() or p.resolve() == THIS or "__pycache__" in p.parts:
            continue
        if p.suffix.lower() not in TEXT_SUFFIXES:
            continue
        paths.append(p)
    return sorted(set(paths))


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # not a text file


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """The anchors of every heading (outside code blocks), with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m is None:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_slug_follows_github() -> None:
    assert slug("K-FAC") == "k-fac"
    assert slug("The one-idea update") == "the-one-idea-update"
    assert slug("Sophia-G") == "sophia-g"
    assert slug("Levenberg-Marquardt") == "levenberg-marquardt"
    assert slug("Block first, then assign") == "block-first-then-assign"
    assert slug("`inverse_root` (p = 2)") == "inverse_root-p--2"
    assert anchors("# A\n## A\n```\n## B\n```\n### c d\n") == {"a", "a-1", "c-d"}


def test_nothing_cites_the_notes_outside_the_repository() -> None:
    files = _files()
    assert any(p.name == "algorithms.md" for p in files), "docs/algorithms.md is missing"
    hits = []
    for path in files:
        text = _text(path)
        if text is None:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, (
        "cite the project's own docs (docs/algorithms.md#<section>, docs/design.md), not notes users "
        "do not have:\n" + "\n".join(hits)
    )


def test_every_algorithms_anchor_cited_exists() -> None:
    doc = ROOT / "docs" / "algorithms.md"
    known = anchors(doc.read_text(encoding="utf-8"))
    assert {"the-one-idea-update", "k-fac", "shampoo", "k-bfgs", "built-in-recipes"} <= known
    cited: dict[str, list[str]] = {}
    for path in _files():
        text = _text(path)
        if text is None:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            for anchor in CITATION.findall(line):
                cited.setdefault(anchor, []).append(f"{path.relative_to(ROOT)}:{n}")
        if path == doc or path.parent == doc.parent:  # relative links inside docs/: (algorithms.md#x), (#x)
            own = r"(?:algorithms\.md)?" if path == doc else r"algorithms\.md"
            pattern = r"\]\(" + own + r"#([A-Za-z0-9_\-]+)\)"
            for n, line in enumerate(text.splitlines(), 1):
                for anchor in re.findall(pattern, line):
                    cited.setdefault(anchor, []).append(f"{path.relative_to(ROOT)}:{n}")
    assert cited, "no file cites docs/algorithms.md#<section>"
    missing = {a: where for a, where in cited.items() if a not in known}
    assert not missing, "citations of docs/algorithms.md sections that do not exist: " + "; ".join(
        f"#{a} ({', '.join(w[:3])})" for a, w in sorted(missing.items())
    )

"""The documentation runs as written.

* ``mkdocs build --strict`` succeeds: no broken link, anchor or API reference (skipped only when mkdocs is missing);
* every ```` ```python ```` block of README.md and docs/*.md executes — the blocks of one page in order, in one
  namespace, in a temporary working folder; a block meant as illustration only is fenced ``text`` or ``console``;
* every script in examples/ exits with status 0;
* the links of README.md and the ``docs/….md#anchor`` references in the sources point at pages and anchors that
  exist, and user-facing text cites the research works by title, not by file names outside the repository.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fisherlens

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
SRC = Path(fisherlens.__file__).resolve().parent

PYTHON = {"python", "py"}
#: fence languages that are shown but never run.
NOT_RUN = {"text", "console", "bash", "shell", "sh", "yaml", "toml", "ini", "json", "csv"}
EXAMPLE_TIMEOUT = 300


# ----------------------------------------------------------------------------- Markdown helpers
@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the first code line
    lang: str
    code: str


def code_blocks(page: Path) -> list[Block]:
    """Fenced code blocks of a Markdown page (``` or ~~~ fences, possibly indented inside lists)."""
    blocks, lines = [], page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{re.escape(fence[0]) * len(fence)}\s*$", lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{page.name}:{start}: unclosed code fence")
        blocks.append(Block(page, start + 1, lang, textwrap.dedent("\n".join(body)) + "\n"))
        i += 1
    return blocks


def slugify(heading: str) -> str:
    """The anchor Python-Markdown's ``toc`` extension (and GitHub, for ASCII headings) gives a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = text.replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    """Heading anchors of a page (headings outside code fences) plus explicit ``<a id="...">`` ones."""
    found, fence = set(), None
    for line in page.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\s*(`{3,}|~{3,})", line)
        if m:
            fence = None if fence and m.group(1).startswith(fence) else (fence or m.group(1))
            continue
        if fence is None:
            h = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
            if h:
                found.add(slugify(h.group(1)))
            found.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", line))
    return found


def _runnable_pages() -> list[Path]:
    return [p for p in PAGES if any(b.lang in PYTHON for b in code_blocks(p))]


# ----------------------------------------------------------------------------- the build
def test_mkdocs_build_strict(tmp_path):
    """``mkdocs build --strict`` fails on a broken link, anchor, page or ``::: reference``."""
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            pytest.skip(f"{module} is not installed, so the documentation cannot be built; "
                        "pip install -e '.[dev]' installs mkdocs, mkdocs-material and mkdocstrings[python].")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "site" / "conventions" / "index.html").exists()


# ----------------------------------------------------------------------------- code blocks
def test_every_fence_says_whether_it_runs():
    """A fence without a language would silently not run: each one is python (run) or one of NOT_RUN."""
    bad = [f"{b.page.name}:{b.line - 1} ({b.lang or 'no language'})" for p in PAGES for b in code_blocks(p)
           if b.lang not in PYTHON | NOT_RUN]
    assert not bad, f"label these fences python (run by this test) or text/console (shown only): {bad}"


@pytest.fixture
def clean_torch_state():
    """Blocks may seed torch, change the default dtype or the thread count: restore all of it afterwards."""
    dtype, threads, rng = torch.get_default_dtype(), torch.get_num_threads(), torch.random.get_rng_state()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    torch.random.set_rng_state(rng)


@pytest.mark.parametrize("page", _runnable_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(page, tmp_path, monkeypatch, clean_torch_state):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for block in code_blocks(page):
        if block.lang not in PYTHON:
            continue
        # Pad with newlines so that tracebacks give the line numbers of the Markdown file.
        source = "\n" * (block.line - 1) + block.code
        exec(compile(source, str(page), "exec"), namespace)
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close("all")


# ----------------------------------------------------------------------------- examples
def test_there_are_examples():
    assert len(EXAMPLES) >= 5, "examples/ should hold the short runnable tours the docs point to"


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    # The examples import the same fisherlens as this test process, whatever the current folder.
    path = os.pathsep.join([str(SRC.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=EXAMPLE_TIMEOUT)
    assert proc.returncode == 0, f"{script.name} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip(), f"{script.name} printed nothing"


# ----------------------------------------------------------------------------- references
def _check_target(source: str, target: str, base: Path) -> str | None:
    """None if ``target`` (a relative path with an optional #anchor) exists, else what is wrong."""
    path, _, anchor = target.partition("#")
    file = (base / path).resolve() if path else None
    if file is not None and not file.exists():
        return f"{source}: {target}: no such file"
    if anchor and (file is None or file.suffix == ".md") and anchor not in anchors(file):
        return f"{source}: {target}: no heading with anchor #{anchor}"
    return None


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://|^mailto:", target):
            continue
        problems.append(_check_target("README.md", target, ROOT))
    assert not [p for p in problems if p], [p for p in problems if p]


def _sources() -> list[Path]:
    return [*sorted(SRC.rglob("*.py")), *EXAMPLES, *PAGES]


def test_doc_references_in_sources_resolve():
    """Docstrings cite the docs as ``docs/conventions.md#anchor``: the page and the anchor must exist."""
    problems = []
    for f in _sources():
        for m in re.finditer(r"\bdocs/([\w-]+\.md)(#[\w-]+)?", f.read_text(encoding="utf-8")):
            problems.append(_check_target(f.name, m.group(1) + (m.group(2) or ""), DOCS))
    assert not [p for p in problems if p], [p for p in problems if p]


#: Citations a user cannot follow: the team's private conventions file and the research works by file name.
PRIVATE = re.compile(r"SCIENCE(?:\.md|\s*§)|\b[Ss]eeds?\s*`?00\d\b|\b00\d_(?:[0-9a-f]{16}|…)")


def test_citations_are_public():
    found = []
    for f in _sources():
        rel = f.relative_to(SRC).as_posix() if f.is_relative_to(SRC) else f.relative_to(ROOT).as_posix()
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if PRIVATE.search(line):
                found.append(f"{rel}:{n}: {line.strip()[:100]}")
    assert not found, ("cite docs/conventions.md#… and the works of docs/references.md by author and title instead:\n"
                       + "\n".join(found))

"""The documentation: the MkDocs site builds with --strict (a broken link or anchor, or a
page left out of the nav, fails it), README and docs/ say each thing once, and nothing a
user reads carries notes about how the work was organised."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

# words that belong in an issue tracker, not in a page a user reads
WORKING_NOTES = re.compile(r"\bissue [0-9]|\bdraft\b|\bhelpers?\b|this round|second round|"
                           r"belong to others|not committed|\bTODO\b|\bFIXME\b", re.IGNORECASE)


def _mkdocs_available() -> bool:
    return importlib.util.find_spec("mkdocs") is not None and importlib.util.find_spec("material") is not None


def test_docs_site_builds_strict(tmp_path: Path) -> None:
    if not _mkdocs_available():
        msg = ("mkdocs-material is not installed in this environment: `pip install -e '.[test]'` "
               "(or '.[docs]') installs it; `make test` does")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                        str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, f"mkdocs build --strict failed:\n{p.stdout}\n{p.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "http-api" / "index.html").is_file()


def _nav_files(nav: list) -> list[str]:  # type: ignore[type-arg]
    out: list[str] = []
    for item in nav:
        for v in (item.values() if isinstance(item, dict) else [item]):
            out.extend(_nav_files(v) if isinstance(v, list) else [v])
    return out


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_files(cfg["nav"])
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(nav) == pages, f"nav {sorted(nav)} != docs/*.md {pages}"
    assert cfg["plugins"] == ["search"], "only the built-in search plugin: nothing may fetch anything at build time"


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a Markdown text (no code blocks, tables, headings or lists)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.strip().splitlines()]
        if not lines or lines[0].startswith(("#", "|", "<!--", "-", "*", ">", "1.")):
            continue
        joined = " ".join(lines)
        if len(joined) >= 120:
            out.append(joined)
    return out


def test_no_paragraph_stands_both_in_the_readme_and_in_docs() -> None:
    docs_text = " ".join(" ".join(p.read_text().split()) for p in DOCS.glob("*.md"))
    both = [p for p in _paragraphs(README.read_text()) if p in docs_text]
    assert not both, f"README paragraphs copied into docs/ (link instead): {both}"


def test_readme_is_one_screen_per_topic_and_at_most_250_lines() -> None:
    assert len(README.read_text().splitlines()) <= 250


@pytest.mark.parametrize("path", [README, *sorted(DOCS.glob("*.md")), *sorted((ROOT / "configs").glob("*.yaml"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_user_facing_text_has_no_working_notes(path: Path) -> None:
    hits = [f"{path.relative_to(ROOT)}:{i}: {ln.strip()}" for i, ln in enumerate(path.read_text().splitlines(), 1)
            if WORKING_NOTES.search(ln)]
    assert not hits, "\n".join(hits)


def test_readme_links_to_docs_pages_that_exist() -> None:
    for target in re.findall(r"\]\((docs/[^)#]*)", README.read_text()):
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"

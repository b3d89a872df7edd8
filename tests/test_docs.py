"""The README and docs/: every relative link resolves, the README keeps its two set-up
commands and stays a short guide, and every page under docs/ is reachable from it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_links", ROOT / "docs" / "check_links.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_relative_link_resolves():
    check = _checker()
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = {str(f.relative_to(ROOT)): check.broken_links(f) for f in files}
    assert {f: b for f, b in broken.items() if b} == {}


def test_the_checker_catches_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [bad](#nowhere)\n")
    assert len(_checker().broken_links(page)) == 2


def test_readme_opens_with_its_two_set_up_commands():
    """The first two commands: the main job on the offline default, then the tests; the
    training on full BreakHis comes after them."""
    import re

    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert blocks[0].strip() == "pip install -e . && bcd predict --samples --plot figs/ --cam cams/"
    assert blocks[1].strip() == 'pip install -e ".[dev]" && python -m pytest'
    assert text.index("bcd train --preset breakhis-gpu") > text.index(blocks[1])


def test_readme_stays_a_short_guide():
    """Mechanism and every figure's details live under docs/; the README is a guide."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_docs_page_is_reachable_from_the_readme():
    check = _checker()
    seen, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        for target in check.relative_links(page):
            dest = (page.parent / target.partition("#")[0]).resolve()
            if dest.suffix == ".md" and dest.is_file() and dest not in seen:
                seen.add(dest)
                todo.append(dest)
    assert {p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in seen} == set()

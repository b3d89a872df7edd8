#!/usr/bin/env python3
"""Check that every relative link in README.md and docs/*.md points at a file and anchor.

    python docs/check_links.py        # from the repository root; exit 1 lists broken links

Anchors follow GitHub's rule (lower case, punctuation dropped, spaces to hyphens, repeated
headings numbered -1, -2...), so a renamed heading breaks the links that point at it here
rather than silently on GitHub.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)\)")
_FENCE = re.compile(r"^(```|~~~)")


def _prose(text: str) -> list[str]:
    """Lines outside fenced code blocks, inline code removed (links in code are not links)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's anchor for every heading of a Markdown file."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(md: Path) -> list[str]:
    """The relative link targets of one Markdown file, in order (``docs/x.md#part``, ``#top``);
    links to other sites (http:, https:, mailto:) and links inside code are left out."""
    return [target for line in _prose(md.read_text(encoding="utf-8"))
            for target in _LINK.findall(line)
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def broken_links(md: Path) -> list[str]:
    """Relative links of one Markdown file whose target file or anchor does not exist."""
    bad = []
    name = md.relative_to(ROOT) if md.resolve().is_relative_to(ROOT) else md
    for target in relative_links(md):
        file_part, _, anchor = target.partition("#")
        dest = (md.parent / file_part).resolve() if file_part else md
        if not dest.exists():
            bad.append(f"{name}: {target} (no such file)")
        elif anchor and (dest.is_dir() or dest.suffix != ".md" or anchor not in anchors(dest)):
            bad.append(f"{name}: {target} (no such heading)")
    return bad


def main() -> int:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    bad = [b for md in files for b in broken_links(md)]
    checked = sum(len(_LINK.findall("\n".join(_prose(md.read_text())))) for md in files)
    for b in bad:
        print(b)
    print(f"{len(files)} files, {checked} links, {len(bad)} broken")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

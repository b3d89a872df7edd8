"""Whole slides: the results of ``bcd slide --out DIR`` as /api/slides lists and serves them,
read again whenever slides.csv changes (a cache, and one build at a time), with regions.geojson
notes and no local paths."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import threading
import time
from pathlib import Path, PureWindowsPath
from typing import Any
from urllib.parse import quote

from ..errors import UserError
from ..files import unguard_cell

log = logging.getLogger(__name__)

SLIDE_FILES = {"heatmap.png": "image/png", "tissue.png": "image/png",
               "top_tiles.png": "image/png", "regions.geojson": "application/geo+json",
               "tiles.csv": "text/csv; charset=utf-8"}
"""The files of a slide's ``bcd slide`` folder that are served, and their media types
(slide.json is not: it records the slide's local path)."""

TOP_REGIONS = 5
"""Largest regions of a slide listed by /api/slides."""

REGIONS_MAX_BYTES = 8 << 20
"""A regions.geojson larger than this is not read for the listing (its row says so); the file
itself is still served. ``bcd slide`` writes a few kB for a slide of hundreds of regions."""


# An absolute path inside a message: POSIX (not after a word, as in "and/or", nor in a URL),
# home, Windows drive or UNC share, or a file: URL; up to the next space or quote.
_PATH_IN_TEXT = re.compile(r"(?:file:)?(?:(?<![\w.:/])/|~/|\b[A-Za-z]:[\\/]|\\\\)[^\s'\"]*")


def _slide_name(slide: str) -> str:
    """The file name of a slide given as a path (POSIX or Windows)."""
    return PureWindowsPath(slide.removeprefix("file:")).name or "(slide)"


def _without_paths_in(text: str, slide: str) -> str:
    """``text`` with the slide's path and any other absolute path cut to their last part."""
    if slide:
        text = text.replace(slide, _slide_name(slide))
    return _PATH_IN_TEXT.sub(lambda m: PureWindowsPath(m[0].removeprefix("file:")).name, text)


def _number(text: Any, kind: type = float) -> float | int | None:
    """A CSV cell as a finite number, or None (empty, NaN, not a number)."""
    try:
        x = float(text)
    except (TypeError, ValueError):
        return None
    return kind(x) if math.isfinite(x) else None


class Slides:
    """The results of ``bcd slide --out DIR``, read again whenever slides.csv changes, so that
    a run still going shows each slide as it finishes.

    Only what ``slides.csv`` lists is served: a file of :data:`SLIDE_FILES`, in a folder named
    in the table that is, once links are resolved, a direct child of DIR. The table and the
    listing are kept while slides.csv and DIR stay as they were (same file, size and times),
    so that a listing of thousands of slides is not rebuilt on every request.
    """

    SETTLED_NS = 2_000_000_000
    """A slides.csv changed less than this long ago (ns) is read afresh every time: a file
    rewritten within its file system's timestamp granularity keeps its modification time."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--slides {root}: not a folder; give the --out folder of "
                            "`bcd slide SLIDE... --out DIR`.")
        if not (self.root / "slides.csv").is_file():
            log.warning("%s has no slides.csv yet; run `bcd slide SLIDE... --out %s`.",
                        self.root, root)
        # (stamp, value): replaced whole, so threads answering at once see one or the other.
        self._table: tuple[Any, tuple[list[dict[str, str]], str | None, frozenset[str]]] | \
            None = None
        self._listing: tuple[Any, dict[str, Any]] | None = None
        self._building = threading.Lock()
        self._fresh: tuple[float, dict[str, Any]] | None = None  # (build start, listing)

    def _stamp(self) -> tuple[int, ...] | None:
        """What identifies this version of slides.csv and of DIR's entries, or None when
        slides.csv is missing or too recent to be told from its next version."""
        try:
            csv_stat, dir_stat = os.stat(self.root / "slides.csv"), os.stat(self.root)
        except OSError:
            return None
        # Recent: within SETTLED_NS before now. A time in the future (a skewed clock, a
        # touched file) is no reason never to cache: a rewrite now would change the stamp.
        age = time.time_ns() - max(csv_stat.st_mtime_ns, csv_stat.st_ctime_ns,
                                   dir_stat.st_mtime_ns)
        if 0 <= age < self.SETTLED_NS:
            return None
        return (csv_stat.st_dev, csv_stat.st_ino, csv_stat.st_size, csv_stat.st_mtime_ns,
                csv_stat.st_ctime_ns, dir_stat.st_mtime_ns)

    def table(self) -> tuple[list[dict[str, str]], str | None]:
        """The rows of slides.csv, or none and why."""
        try:
            with open(self.root / "slides.csv", newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                # Cells guarded against spreadsheets (bcd slide writes '=x.tif) read as written.
                rows = [{k: unguard_cell(v) for k, v in row.items()} for row in reader]
                columns = set(reader.fieldnames or ())
        except FileNotFoundError:
            return [], ("no slides analysed yet: run `bcd slide SLIDE... --out DIR` with the "
                        "DIR this server was started with (bcd serve --slides DIR); each slide "
                        "shows up here as it is done.")
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            return [], (f"slides.csv could not be read ({type(e).__name__}); run `bcd slide "
                        "SLIDE... --out DIR` again to rewrite it.")
        if not {"slide", "folder"} <= columns:
            return [], ("slides.csv is not one written by `bcd slide` (no 'slide' and "
                        "'folder' columns); run `bcd slide SLIDE... --out DIR` again.")
        return rows, None

    def _read(self, stamp: tuple[int, ...] | None
              ) -> tuple[list[dict[str, str]], str | None, frozenset[str]]:
        """:meth:`table` and the set of its folders, from the last read while ``stamp`` (of
        :meth:`_stamp`) is that read's."""
        cached = self._table
        if stamp is not None and cached is not None and cached[0] == stamp:
            return cached[1]
        rows, message = self.table()
        read = rows, message, frozenset(row.get("folder") or "" for row in rows)
        if stamp is not None:
            self._table = (stamp, read)
        return read

    def file(self, folder: str, name: str, folders: frozenset[str] | None = None
             ) -> Path | None:
        """The path of ``folder/name`` if it may be served, else None. ``folders``: those of
        slides.csv, when the caller has them."""
        if name not in SLIDE_FILES or folder in ("", ".", "..") or any(
                c in folder for c in "/\\\0"):
            return None
        if folders is None:
            folders = self._read(self._stamp())[2]
        if folder not in folders:
            return None
        try:
            # Links are followed, then the real folder must sit directly in DIR and the real
            # file directly in it: a link out of DIR is refused.
            where = (self.root / folder).resolve(strict=True)
            path = (where / name).resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if where.parent != self.root or path.parent != where or not path.is_file():
            return None
        return path

    def _regions(self, path: Path | None
                 ) -> tuple[int | None, list[dict[str, Any]], str | None]:
        """The number of regions in a regions.geojson, the largest few, and a note when the
        file could not be read (too large, malformed, nested too deep): that row's, never
        the listing's failure."""
        if path is None:
            return None, [], None
        try:
            if path.stat().st_size > REGIONS_MAX_BYTES:
                return None, [], (f"regions.geojson is over {REGIONS_MAX_BYTES >> 20} MB: not "
                                  "read for this list (download it, or open it in QuPath)")
            features = json.loads(path.read_text(encoding="utf-8"))["features"]
            props = [f.get("properties") for f in features]
            if not all(isinstance(p, dict) for p in props):
                raise TypeError("a feature's properties are not an object")
            top = sorted(props, key=lambda p: _number(p.get("area_mm2")) or 0, reverse=True)
            return len(props), [{"tiles": _number(p.get("tiles"), int),
                                 "area_mm2": _number(p.get("area_mm2")),
                                 "max_p": _number(p.get("max_p"))} for p in top[:TOP_REGIONS]
                                ], None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            return None, [], (f"regions.geojson is not one `bcd slide` writes "
                              f"({type(e).__name__}); run `bcd slide ... --force` for this "
                              "slide to rewrite it")

    def listing(self) -> dict[str, Any]:
        """One entry per row of slides.csv, with its largest regions and file URLs; built by
        one request at a time: the others wait, and take the one built by a request that
        started building after they arrived (it is at least as new as what they asked for),
        so that requests arriving together right after slides.csv changes cost one build."""
        arrived = time.monotonic()
        with self._building:
            fresh = self._fresh
            if fresh is not None and fresh[0] >= arrived:
                return fresh[1]
            started = time.monotonic()
            listing = self._listing_now()
            self._fresh = (started, listing)
            return listing

    def _listing_now(self) -> dict[str, Any]:
        stamp = self._stamp()
        cached = self._listing
        if stamp is not None and cached is not None and cached[0] == stamp:
            return cached[1]
        rows, message, folders = self._read(stamp)
        slides = []
        for row in rows:
            slide, folder = row.get("slide") or "", row.get("folder") or ""
            paths = {name: self.file(folder, name, folders) for name in SLIDE_FILES}
            files = {name: f"slides/{quote(folder, safe='')}/{name}"
                     for name, path in paths.items() if path is not None}
            count, top, note = self._regions(paths["regions.geojson"])
            slides.append({
                "name": _slide_name(slide), "folder": folder,
                "score": _number(row.get("score")), "tiles": _number(row.get("tiles"), int),
                "tumour_tiles": _number(row.get("tumour_tiles"), int),
                "tissue_mm2": _number(row.get("tissue_mm2")),
                "error": _without_paths_in(row.get("error") or "", slide),
                "regions": count, "largest_regions": top, "files": files, "note": note,
            })
        listing = {"slides": slides, "message": message}
        if stamp is not None:
            self._listing = (stamp, listing)
        return listing

"""Writing files safely (atomic replace) and turning numpy values into plain Python."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Writes ``path`` through ``write(file)`` into a temporary file, then renames it.

    A crash or a full disk mid-write leaves the previous file intact, never half a file. The
    temporary name is unique per process and thread, so concurrent writers do not collide.

    Raises:
        OSError: the write failed; the temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Writes UTF-8 text atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def plain(value: Any) -> Any:
    """numpy scalars become Python numbers and tuples lists, recursively.

    What YAML dumps without python/ tags and ``torch.load(weights_only=True)`` reads back.
    NaN stays NaN (use :func:`jsonable` for JSON).
    """
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def jsonable(value: Any) -> Any:
    """Like :func:`plain`, and NaN/inf become null, arrays lists, paths strings, keys strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, Path):
        return str(value)
    return value


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(table):
    """``table`` with every text cell that a spreadsheet would run as a formula (one that
    begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return: a file named
    ``=cmd|calc.png``) prefixed with ``'``, which spreadsheets show as text; numbers are
    left as they are."""
    from pandas.api.types import is_numeric_dtype

    out = table.copy()
    for column in out.columns:
        if not is_numeric_dtype(out[column]):  # object, or pandas' own string dtype
            out[column] = [f"'{v}" if isinstance(v, str) and v.startswith(_FORMULA_START)
                           else v for v in out[column]]
    return out


def from_spreadsheet_safe(table):
    """:func:`spreadsheet_safe` undone: the ``'`` it put before a text cell is taken off
    again (``pd.read_csv(path).pipe(from_spreadsheet_safe)`` reads the original text)."""
    from pandas.api.types import is_numeric_dtype

    out = table.copy()
    for column in out.columns:
        if not is_numeric_dtype(out[column]):
            out[column] = [unguard_cell(v) for v in out[column]]
    return out


def unguard_cell(value):
    """One cell as it was before :func:`spreadsheet_safe` guarded it."""
    if isinstance(value, str) and value[:1] == "'" and value[1:].startswith(_FORMULA_START):
        return value[1:]
    return value


def plural(n: int, noun: str) -> str:
    """``1 image``, ``2 images``: a count with its noun (regular plurals)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def unique_stems(paths: list[Path], default: str = "file") -> list[str]:
    """A distinct name per input for its outputs: the file's stem, numbered (``-2``,
    ``-3``...) when it is taken (``a/x``, ``b/x``, ``x-2`` give ``x``, ``x-2``, ``x-2-2``)."""
    return unique_names([Path(p).stem for p in paths], default)


def unique_names(names: list[str], default: str = "file") -> list[str]:
    """``names`` made distinct: one already taken is numbered (``-2``, ``-3``...); an empty
    one is ``default``."""
    used: set[str] = set()
    out = []
    for stem in names:
        stem = name = stem or default
        k = 1
        while name in used:
            k += 1
            name = f"{stem}-{k}"
        used.add(name)
        out.append(name)
    return out

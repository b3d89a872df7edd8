"""What reading a slide may cost, decided from its headers before its pixels: the errors a
slide is refused with, the bounds on what its header may claim and on a JPEG tile's frame,
and the per-slide deadline."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import UserError


class SlideError(UserError, RuntimeError):
    """A slide that cannot be analysed; the message names the file and what to do."""


class SlideTooCostly(SlideError):
    """A slide refused for what reading it would cost (its header's claims, a tile frame
    larger than its tile, its deadline): never retried another way."""


MAX_SLIDE_PIXELS = 100e9
"""Level-0 pixels a slide may claim (``--max-slide-gigapixels``): the largest scans are about
0.2 x 0.1 megapixels a side, 20 gigapixels."""

MAX_THUMBNAIL_READ_PIXELS = 10e9
"""Pixels of the pyramid level a thumbnail may be read from: a slide without a level near
the thumbnail's scale (no pyramid) would be read whole, strip by strip."""


def check_cost(slide, path: str | Path, thumb_side: int, *,
               max_pixels: float = MAX_SLIDE_PIXELS) -> None:
    """Refuses, from the header alone, a slide whose reading would cost far more than its
    file suggests: more level-0 pixels than ``max_pixels``, or a thumbnail that would have to
    be read from a level of more than :data:`MAX_THUMBNAIL_READ_PIXELS` pixels.

    Raises:
        SlideTooCostly: naming the slide, what it claims, and the limit.
    """
    w0, h0 = slide.dimensions
    if w0 * h0 > max_pixels:
        raise SlideTooCostly(
            f"{path}: its header claims {w0:,} x {h0:,} px ({w0 * h0 / 1e9:,.0f} gigapixels), "
            f"over the limit of {max_pixels / 1e9:g} (--max-slide-gigapixels); a real scan "
            "is rarely over 20. Check the file; raise the limit only for a slide you trust.")
    ds = max(w0, h0) / thumb_side if max(w0, h0) > thumb_side else 1.0
    level = slide.get_best_level_for_downsample(ds)
    lw, lh = slide.level_dimensions[level]
    if lw * lh > MAX_THUMBNAIL_READ_PIXELS:
        raise SlideTooCostly(
            f"{path}: its thumbnail would be read from a level of {lw:,} x {lh:,} px (level "
            f"{level} of {slide.level_count}; {lw * lh / 1e9:,.0f} gigapixels, over the limit "
            f"of {MAX_THUMBNAIL_READ_PIXELS / 1e9:g}): the slide has no pyramid level near the "
            "thumbnail's scale. Write it as a pyramid (e.g. `vips tiffsave IN OUT.tif --tile "
            "--pyramid`) and run it again.")


def check_deadline(deadline: float | None, path: str | Path, timeout: float | None) -> None:
    """Raises :class:`SlideTooCostly` once ``time.monotonic()`` passes ``deadline``."""
    if deadline is not None and time.monotonic() > deadline:
        raise SlideTooCostly(f"{path}: not done within --slide-timeout {timeout:g} s; the "
                             "other slides go on. Raise the limit for a slide this large.")


_JPEG_SOF = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)}


def jpeg_frame_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of a JPEG stream's frame, from its SOF marker, without decoding;
    None when the stream has none before its first scan (or is not JPEG)."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _JPEG_SOF and i + 9 <= len(data):
            height = int.from_bytes(data[i + 5:i + 7], "big")
            width = int.from_bytes(data[i + 7:i + 9], "big")
            return width, height
        if marker == 0xDA or length < 2:  # start of scan: no frame header came first
            return None
        i += 2 + length
    return None

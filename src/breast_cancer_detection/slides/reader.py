"""Reading whole-slide images with OpenSlide: open, scale, thumbnail, tiles for a DataLoader.

OpenSlide comes from pip wheels (``pip install "breast-cancer-detection[slides]"`` installs
openslide-python and openslide-bin), so no system library is needed on Linux, macOS or Windows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.datasets import open_rgb
from ..errors import UserError

# What OpenSlide reads (its vendor formats; .tif/.tiff covers Philips, Ventana and generic
# tiled TIFF).
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif",
                  ".svslide", ".dcm")

INSTALL_HINT = ('pip install "breast-cancer-detection[slides]" (or: pip install '
                "openslide-python openslide-bin): pip wheels, no system library needed")

# Pixels held at once while a thumbnail is built strip by strip.
_STRIP_PIXELS = 8_000_000


class SlideError(UserError, RuntimeError):
    """A slide that cannot be analysed; the message names the file and what to do."""


def _openslide():
    try:
        import openslide
    except ImportError as e:
        raise UserError(f"whole slides need OpenSlide: {INSTALL_HINT}.") from e
    return openslide


def collect_slides(paths) -> list[Path]:
    """Slide files from files and folders (folders searched recursively, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file()
                          and f.suffix.lower() in SLIDE_SUFFIXES)
        else:
            out.append(p)
    return out


def open_slide(path: str | Path):
    """Opens a slide with OpenSlide.

    Raises:
        SlideError: no such file, a format OpenSlide does not read (a plain image, say), or a
            damaged file.
    """
    openslide = _openslide()
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: no such file.")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(
            f"{path}: not a whole-slide image OpenSlide reads (tiled, pyramidal .svs, .tif, "
            ".ndpi, .mrxs, ...). For an ordinary photo or a BreakHis PNG use `bcd predict`; "
            "to make a slide of a large image, see bcd.slides.write_slide.") from None
    except openslide.OpenSlideError as e:
        raise SlideError(f"{path}: damaged or truncated slide ({e}); copy it again "
                         "from its source.") from None


def positive_mpp(value: float, flag: str) -> float:
    """``value`` (micrometres per pixel, from ``flag``) if positive.

    Raises:
        SlideError: it is not.
    """
    if not value > 0:
        raise SlideError(f"{flag} {value}: a positive number of micrometres per pixel (about "
                         "0.25 for a 40x scan; 0.972 for PatchCamelyon models).")
    return float(value)


def slide_mpp(slide, path: str | Path = "slide", override: float | None = None
              ) -> tuple[float, str]:
    """Micrometres per level-0 pixel of a slide, and where the figure came from.

    In order: ``override`` (``--mpp``); the slide's ``openslide.mpp-x``/``-y``; its objective
    power, as 10 / power um/px (the usual scanner optics: 40x is about 0.25 um/px).

    Raises:
        SlideError: none of the three is known.
    """
    if override is not None:
        return positive_mpp(override, "--mpp"), "--mpp"
    props = slide.properties
    try:
        mx = float(props.get("openslide.mpp-x", "nan"))
        my = float(props.get("openslide.mpp-y", mx))
    except ValueError:
        mx = my = float("nan")
    if np.isfinite(mx) and mx > 0:
        my = my if np.isfinite(my) and my > 0 else mx
        return (mx + my) / 2, "slide metadata (mpp)"
    try:
        power = float(props.get("openslide.objective-power", "nan"))
    except ValueError:
        power = float("nan")
    if np.isfinite(power) and power > 0:
        return 10.0 / power, f"objective power {power:g}x (10 / power um/px)"
    raise SlideError(
        f"{path}: the slide states neither its pixel size (mpp) nor its objective power, so "
        "its scale is unknown. Give it: --mpp UM_PER_PIXEL (about 0.25 for a 40x scan, 0.5 "
        "for 20x; the scanner's documentation has the exact figure).")


def read_region(slide, location: tuple[int, int], level: int, size: tuple[int, int],
                path: str | Path = "slide") -> Image.Image:
    """``slide.read_region``, with OpenSlide's errors (a damaged or truncated file found
    only when its pixels are read) as a :class:`SlideError` naming the file."""
    openslide = _openslide()
    try:
        return slide.read_region(location, level, size)
    except openslide.OpenSlideError as e:
        raise SlideError(f"{path}: damaged or truncated slide: reading {size[0]}x{size[1]} px "
                         f"at {location}, level {level} failed ({e}); copy it again from its "
                         "source.") from None


def thumbnail(slide, max_side: int, path: str | Path = "slide") -> tuple[np.ndarray, float]:
    """An RGB thumbnail whose long side is at most ``max_side``, and its downsample from
    level 0.

    Read from the coarsest level that still has the resolution, in strips, so memory stays
    bounded by the thumbnail even for a slide with no pyramid.
    """
    w0, h0 = slide.dimensions
    ds = max(w0, h0) / max_side if max(w0, h0) > max_side else 1.0
    tw, th = max(1, round(w0 / ds)), max(1, round(h0 / ds))
    level = slide.get_best_level_for_downsample(ds)
    lds = slide.level_downsamples[level]
    lw, lh = slide.level_dimensions[level]
    strip = max(1, _STRIP_PIXELS // max(lw, 1))
    out = np.empty((th, tw, 3), np.uint8)
    done = 0
    for y in range(0, lh, strip):
        hl = min(strip, lh - y)
        y_end = min(th, round((y + hl) * lds / ds)) if y + hl < lh else th
        rows = y_end - done
        if rows <= 0:
            continue
        region = read_region(slide, (0, round(y * lds)), level, (lw, hl), path)
        rgb = open_rgb(region, max_pixels=None).resize((tw, rows), Image.Resampling.BILINEAR)
        out[done:y_end] = np.asarray(rgb)
        done = y_end
    return out, ds


class TileDataset(torch.utils.data.Dataset):
    """Tiles of one slide at the model's scale, read in batches: ``(uint8 (B, 3, size, size)
    tensor, indices)``; normalise whole batches (:func:`normalize_batch`), which costs less
    than a per-tile float transform and sends a quarter of the bytes between processes.

    Tiles side by side in a row of the grid are read with one ``read_region`` call (a strip of
    up to :attr:`MAX_RUN` tiles) and cut apart, straight into the batch: that saves the
    per-call work and a PIL image per tile (about a fifth of the reading time on the demo
    slides, docs/benchmarks.md "Whole slides"). A strip is used only where each tile's place
    in it is within half a level pixel of where its own call would read it (always, when the
    tile side is a whole number of level pixels).

    Each process (the main one or a worker) opens the slide once itself: OpenSlide handles
    are not shared between processes.

    Args:
        path: The slide.
        xy: ``(N, 2)`` level-0 top-left corners, in grid order (row by row, left to right).
        level: Pyramid level to read.
        read_size: Tile side in that level's pixels.
        size: Tile side the model takes; the read tile is resized to it.
        level_downsample: The level's downsample from level 0 (None: asked of the slide).
    """

    MAX_RUN = 16

    def __init__(self, path: str | Path, xy: np.ndarray, level: int, read_size: int,
                 size: int, level_downsample: float | None = None):
        self.path = str(path)
        self.xy = np.asarray(xy, dtype=np.int64).reshape(-1, 2)
        self.level, self.read_size, self.size = level, read_size, size
        self._downsample = level_downsample
        self._slide = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.xy)

    def open(self):
        """The slide's handle in this process (opened on first use)."""
        if self._slide is None or self._pid != os.getpid():
            self._slide, self._pid = open_slide(self.path), os.getpid()
            if self._downsample is None:
                self._downsample = float(self._slide.level_downsamples[self.level])
        return self._slide

    def read(self, i: int) -> Image.Image:
        """Tile ``i`` as an RGB image of ``size`` x ``size`` pixels, read on its own."""
        x, y = (int(v) for v in self.xy[i])
        # RGBA, transparent where the slide has no data: composited on white.
        img = open_rgb(read_region(self.open(), (x, y), self.level,
                                   (self.read_size, self.read_size), self.path), max_pixels=None)
        if self.read_size != self.size:
            img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self.read(i))).permute(2, 0, 1), i

    def runs(self, start: int, stop: int) -> list[tuple[int, int]]:
        """``(first, count)`` of the strips tiles ``start..stop-1`` are read in."""
        self.open()
        step = self.read_size * self._downsample  # level-0 pixels between strip neighbours
        out: list[tuple[int, int]] = []
        first = start
        for i in range(start + 1, stop + 1):
            k = i - first
            if (i < stop and k < self.MAX_RUN and self.xy[i, 1] == self.xy[first, 1]
                    and abs(self.xy[i, 0] - self.xy[first, 0] - k * step)
                    <= 0.5 * self._downsample):
                continue
            out.append((first, k))
            first = i
        return out

    def read_batch(self, start: int, stop: int) -> torch.Tensor:
        """Tiles ``start..stop-1`` as ``(B, 3, size, size)`` uint8 (channels-last memory)."""
        slide, rs, size = self.open(), self.read_size, self.size
        out = np.empty((stop - start, size, size, 3), np.uint8)
        for first, k in self.runs(start, stop):
            x, y = (int(v) for v in self.xy[first])
            region = read_region(slide, (x, y), self.level, (k * rs, rs), self.path)
            rgba = np.asarray(region)
            if rgba[..., 3].min() < 255:  # transparent where the slide has no data
                rgba = np.asarray(open_rgb(region, max_pixels=None))
            rgb = rgba[..., :3]
            if rs == size:
                out[first - start:first - start + k] = rgb.reshape(rs, k, rs, 3).swapaxes(0, 1)
                continue
            for j in range(k):
                tile = Image.fromarray(np.ascontiguousarray(rgb[:, j * rs:(j + 1) * rs]))
                out[first - start + j] = np.asarray(
                    tile.resize((size, size), Image.Resampling.BILINEAR))
        return torch.from_numpy(out).permute(0, 3, 1, 2)

    def batches_by_index(self, batch_size: int) -> _Batches:
        """Batch ``k`` as ``self.batches_by_index(batch_size)[k]``: ``(uint8 tiles,
        indices)``."""
        return _Batches(self, batch_size)

    def batches(self, batch_size: int, workers: int) -> Iterator[tuple[torch.Tensor,
                                                                      torch.Tensor]]:
        """``(uint8 (B, 3, size, size), indices)`` batches in order.

        With ``workers`` processes, a DataLoader reads whole batches. With none, one thread
        reads the next batch while the caller scores this one (OpenSlide, ONNX Runtime and
        PyTorch release the GIL): on 2 cores that beats worker processes, which take cores
        from the model (docs/benchmarks.md, "Whole slides").
        """
        batches = self.batches_by_index(batch_size)
        if workers > 0:
            try:
                yield from torch.utils.data.DataLoader(batches, batch_size=None,
                                                       num_workers=workers)
            except UserError as e:
                # A worker's error comes back with the worker's traceback in its message:
                # keep the sentence, which names the file and what to do.
                last = str(e).strip().splitlines()[-1]
                raise type(e)(last.split(": ", 1)[-1] if "Error: " in last else last) from None
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="bcd-tiles") as pool:
            ahead = pool.submit(batches.__getitem__, 0) if len(batches) else None
            for k in range(len(batches)):
                batch = ahead.result()
                if k + 1 < len(batches):
                    ahead = pool.submit(batches.__getitem__, k + 1)
                yield batch

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_slide": None, "_pid": None}


class _Batches(torch.utils.data.Dataset):
    """Batch ``k`` of a :class:`TileDataset` as one item ``(tiles, indices)``, so that a
    DataLoader's workers read whole batches (strips and all)."""

    def __init__(self, tiles: TileDataset, batch_size: int):
        self.tiles, self.batch_size = tiles, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.tiles) / self.batch_size)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = k * self.batch_size
        stop = min(len(self.tiles), start + self.batch_size)
        return self.tiles.read_batch(start, stop), torch.arange(start, stop)

"""Reading whole-slide images with OpenSlide: open, scale, thumbnail, tiles for a DataLoader.

OpenSlide comes from pip wheels (``pip install "breast-cancer-detection[slides]"`` installs
openslide-python and openslide-bin), so no system library is needed on Linux, macOS or Windows.
"""

from __future__ import annotations

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
    """Tiles of one slide at the model's scale, for a DataLoader: ``(uint8 (3, size, size)
    tensor, index)`` per tile; normalise whole batches (:func:`normalize_batch`), which costs
    less than a per-tile float transform and sends a quarter of the bytes between processes.

    Each process (the main one or a worker) opens the slide once itself: OpenSlide handles
    are not shared between processes.

    Args:
        path: The slide.
        xy: ``(N, 2)`` level-0 top-left corners.
        level: Pyramid level to read.
        read_size: Tile side in that level's pixels.
        size: Tile side the model takes; the read tile is resized to it.
    """

    def __init__(self, path: str | Path, xy: np.ndarray, level: int, read_size: int,
                 size: int):
        self.path = str(path)
        self.xy = np.asarray(xy, dtype=np.int64)
        self.level, self.read_size, self.size = level, read_size, size
        self._slide = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.xy)

    def read(self, i: int) -> Image.Image:
        """Tile ``i`` as an RGB image of ``size`` x ``size`` pixels."""
        if self._slide is None or self._pid != os.getpid():
            self._slide, self._pid = open_slide(self.path), os.getpid()
        x, y = (int(v) for v in self.xy[i])
        # RGBA, transparent where the slide has no data: composited on white.
        img = open_rgb(read_region(self._slide, (x, y), self.level,
                                   (self.read_size, self.read_size), self.path), max_pixels=None)
        if self.read_size != self.size:
            img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self.read(i))).permute(2, 0, 1), i

    def batches(self, batch_size: int, workers: int) -> Iterator[tuple[torch.Tensor,
                                                                      torch.Tensor]]:
        """``(uint8 (B, 3, size, size), indices)`` batches in order.

        With ``workers`` processes, a DataLoader reads them. With none, one thread reads the
        next batch while the caller scores this one (OpenSlide, ONNX Runtime and PyTorch
        release the GIL): on 2 cores that beats worker processes, which take cores from the
        model (docs/benchmarks.md, "Whole slides").
        """
        if workers > 0:
            try:
                yield from torch.utils.data.DataLoader(self, batch_size=batch_size,
                                                       num_workers=workers)
            except UserError as e:
                # A worker's error comes back with the worker's traceback in its message:
                # keep the sentence, which names the file and what to do.
                last = str(e).strip().splitlines()[-1]
                raise type(e)(last.split(": ", 1)[-1] if "Error: " in last else last) from None
            return
        from concurrent.futures import ThreadPoolExecutor

        def read(start: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.arange(start, min(len(self), start + batch_size))
            return torch.stack([self[int(i)][0] for i in idx]), idx

        starts = list(range(0, len(self), batch_size))
        with ThreadPoolExecutor(1, thread_name_prefix="bcd-tiles") as pool:
            ahead = pool.submit(read, starts[0]) if starts else None
            for k in range(len(starts)):
                batch = ahead.result()
                if k + 1 < len(starts):
                    ahead = pool.submit(read, starts[k + 1])
                yield batch

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_slide": None, "_pid": None}

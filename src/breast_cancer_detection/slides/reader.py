"""Reading whole-slide images with OpenSlide: open, scale, thumbnail, tiles for a DataLoader.

OpenSlide comes from pip wheels (``pip install "bcd-histopathology[slides]"`` installs
openslide-python and openslide-bin), so no system library is needed on Linux, macOS or Windows.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.datasets import open_rgb
from ..errors import UserError, install_hint
from .limits import SlideError, SlideTooCostly, check_deadline, jpeg_frame_size
from .tissue import whole_number

# What OpenSlide reads (its vendor formats; .tif/.tiff covers Philips, Ventana and generic
# tiled TIFF).
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif",
                  ".svslide", ".dcm")

INSTALL_HINT = (f"{install_hint('slides')}, or pip install openslide-python openslide-bin: "
                "pip wheels, no system library needed")

# Pixels held at once while a thumbnail is built strip by strip.
_STRIP_PIXELS = 8_000_000


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
    """``value`` (micrometres per pixel, from ``flag``) if positive and finite.

    Raises:
        SlideError: it is not.
    """
    if not (math.isfinite(value) and value > 0):
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


def read_rgb(slide, location: tuple[int, int], level: int, size: tuple[int, int],
             path: str | Path = "slide") -> np.ndarray:
    """:func:`read_region` as ``(h, w, 3)`` uint8 RGB: transparent pixels (where the slide
    has no data) composited on white."""
    region = read_region(slide, location, level, size, path)
    rgba = np.asarray(region)
    if rgba[..., 3].min() < 255:
        rgba = np.asarray(open_rgb(region, max_pixels=None))
    return rgba[..., :3]


def thumbnail(slide, max_side: int, path: str | Path = "slide", *,
              deadline: float | None = None, timeout: float | None = None
              ) -> tuple[np.ndarray, float]:
    """An RGB thumbnail whose long side is at most ``max_side``, and its downsample from
    level 0.

    Read from the coarsest level that still has the resolution, in strips, so memory stays
    bounded by the thumbnail even for a slide with no pyramid; from the TIFF's own tiles when
    the level is a tiled TIFF page with a whole-number downsample (:class:`TiffLevel`: the
    same pixels as OpenSlide's, in a fraction of the time). ``deadline`` (``time.monotonic``)
    is checked before each strip.
    """
    w0, h0 = slide.dimensions
    ds = max(w0, h0) / max_side if max(w0, h0) > max_side else 1.0
    tw, th = max(1, round(w0 / ds)), max(1, round(h0 / ds))
    level = slide.get_best_level_for_downsample(ds)
    lds = slide.level_downsamples[level]
    lw, lh = slide.level_dimensions[level]
    tiff = TiffLevel.for_level(slide, path, level)
    strip = max(1, _STRIP_PIXELS // max(lw, 1))
    out = np.empty((th, tw, 3), np.uint8)
    done = 0
    try:
        for y in range(0, lh, strip):
            hl = min(strip, lh - y)
            y_end = min(th, round((y + hl) * lds / ds)) if y + hl < lh else th
            rows = y_end - done
            if rows <= 0:
                continue
            check_deadline(deadline, path, timeout)
            rgb = None
            if tiff is not None:
                try:
                    rgb = tiff.read(0, y, lw, hl)
                except SlideTooCostly:
                    raise
                except Exception:  # noqa: BLE001 - any decoder error: OpenSlide reads the
                    tiff.close()  # rest (and says so if the slide is damaged)
                    tiff = None
            if rgb is None:
                rgb = read_rgb(slide, (0, round(y * lds)), level, (lw, hl), path)
            out[done:y_end] = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize(
                (tw, rows), Image.Resampling.BILINEAR))
            done = y_end
    finally:
        if tiff is not None:
            tiff.close()
    return out, ds


class TiffLevel:
    """One pyramid level of a tiled TIFF, its tiles read and decoded directly (tifffile, and
    imagecodecs for JPEG), without OpenSlide's per-pixel compositing.

    OpenSlide paints every region through premultiplied ARGB, which costs more than decoding
    the tiles: strips of model tiles cut this way take about a third of the time
    (``python benchmarks/slide.py``, its ``reading`` lines; docs/benchmarks.md, "Whole
    slides"). The pixels are the same: :meth:`for_level` compares its first tile with
    OpenSlide's, and :class:`TileDataset` each slide's first strip, and OpenSlide reads
    wherever they differ. Used for slides OpenSlide opens as generic tiled TIFF or Aperio
    ``.svs``, on a level with a whole-number downsample whose every pixel is a pixel of a
    TIFF page of the same size, read at whole level-pixel positions.

    Decoded TIFF tiles are kept in a cache of :attr:`CACHE_ROWS` rows of them (a strip of
    model tiles crosses several TIFF tiles, and the next grid rows the same ones again; the
    lanes read neighbouring batches), at most :attr:`CACHE_BYTES`: memory stays bounded by
    the level's width, never by the slide. Reads from several threads are safe.
    """

    CACHE_ROWS = 3
    CACHE_BYTES = 64 << 20
    VENDORS = ("generic-tiff", "aperio")

    def __init__(self, path: str | Path, page: Any):
        self.path = str(path)
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.tile_w, self.tile_h = int(page.tilewidth), int(page.tilelength)
        self.across = -(-self.width // self.tile_w)
        self.offsets = np.asarray(page.dataoffsets, np.int64)
        self.counts = np.asarray(page.databytecounts, np.int64)
        self._decode = page.decode
        self._tables = getattr(page, "jpegtables", None)
        self._jpeg = page.compression in (6, 7)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self.cache_bytes = min(self.CACHE_BYTES,
                               self.CACHE_ROWS * self.across * self.tile_w * self.tile_h * 3)
        self._lock = threading.Lock()
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close()

    @classmethod
    def for_level(cls, slide, path: str | Path, level: int) -> TiffLevel | None:
        """The level of ``slide`` (an open OpenSlide) as a :class:`TiffLevel`, or None when
        it cannot be read that way (another format, no tifffile, a downsample that is not a
        whole number, a page that is not tiled 8-bit RGB (or JPEG YCbCr) of the level's size,
        a codec this machine lacks, or a first tile whose pixels are not OpenSlide's)."""
        if slide.properties.get("openslide.vendor") not in cls.VENDORS:
            return None
        step = whole_number(float(slide.level_downsamples[level]))
        if step is None:
            return None
        try:
            import tifffile
        except ImportError:
            return None
        width, height = slide.level_dimensions[level]
        found = None
        try:
            with tifffile.TiffFile(str(path)) as tif:
                for page in tif.pages:
                    if (page.is_tiled and (page.imagewidth, page.imagelength) == (width, height)
                            and page.imagedepth == 1 and page.samplesperpixel == 3
                            and page.bitspersample == 8 and page.planarconfig == 1
                            # RGB; YCbCr only in JPEG tiles (tifffile converts those alone)
                            and (page.photometric == 2
                                 or (page.photometric == 6 and page.compression in (6, 7)))):
                        found = cls(path, page)
                        break
        except Exception:  # noqa: BLE001 - tifffile raises many kinds; OpenSlide reads it
            return None
        if found is None:
            return None
        try:  # a codec this machine lacks (JPEG needs imagecodecs), or other pixels
            first = int(np.argmax(found.counts > 0))
            x, y = (first % found.across) * found.tile_w, (first // found.across) * found.tile_h
            w, h = min(found.tile_w, width - x), min(found.tile_h, height - y)
            mine = found.read(x, y, w, h)  # first: an oversized frame is refused, not decoded
            ref = read_rgb(slide, (x * step, y * step), level, (w, h), path)
            if np.array_equal(mine, ref):
                return found
        except SlideTooCostly:
            found.close()
            raise
        except Exception:  # noqa: BLE001 - any decoder error: OpenSlide reads
            pass
        found.close()
        return None

    def _read_bytes(self, index: int) -> bytes:
        offset, count = int(self.offsets[index]), int(self.counts[index])
        if hasattr(os, "pread"):
            return os.pread(self._file.fileno(), count, offset)
        with self._lock:
            self._file.seek(offset)
            return self._file.read(count)

    def tile(self, index: int) -> np.ndarray:
        """TIFF tile ``index`` decoded, ``(tile_h, tile_w, 3)`` uint8.

        Raises:
            ValueError: an empty or undecodable tile.
        """
        with self._lock:
            got = self._cache.get(index)
            if got is not None:
                self._cache.move_to_end(index)
                return got
        if self.counts[index] <= 0:
            raise ValueError(f"TIFF tile {index} is empty")
        raw = self._read_bytes(index)
        if self._jpeg:
            # The frame header says how many pixels decoding would make: a tile holding a
            # frame larger than the tile is refused before any pixel is decoded.
            frame = jpeg_frame_size(raw)
            if frame is not None and (frame[0] > self.tile_w or frame[1] > self.tile_h):
                raise SlideTooCostly(
                    f"{self.path}: TIFF tile {index} holds a {frame[0]:,} x {frame[1]:,} px "
                    f"JPEG frame, larger than its {self.tile_w} x {self.tile_h} tile: a forged "
                    "or damaged file, refused before decoding. Copy it again from its source.")
        data, _, _ = self._decode(raw, index, jpegtables=self._tables)
        if data is None:
            raise ValueError(f"TIFF tile {index} is empty")
        arr = np.asarray(data).reshape(-1, *np.asarray(data).shape[-3:])[0]
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"TIFF tile {index}: {arr.shape} {arr.dtype}, not 8-bit RGB")
        with self._lock:
            if index not in self._cache:
                self._cache[index] = arr
                self._cached_bytes += arr.nbytes
                while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
                    self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return arr

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The ``(h, w, 3)`` uint8 region at level pixel ``(x, y)``; white outside the image
        (where OpenSlide's transparent pixels, composited on white, are white too).

        Raises:
            ValueError: a tile it crosses is empty or cannot be decoded.
        """
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, self.width), min(y + h, self.height)
        for ty in range(y0 // self.tile_h, (y1 - 1) // self.tile_h + 1) if y1 > y0 else ():
            for tx in range(x0 // self.tile_w, (x1 - 1) // self.tile_w + 1) if x1 > x0 else ():
                tile = self.tile(ty * self.across + tx)
                left, top = tx * self.tile_w, ty * self.tile_h
                ax, ay = max(x0, left), max(y0, top)
                bx = min(x1, left + self.tile_w, left + tile.shape[1])
                by = min(y1, top + self.tile_h, top + tile.shape[0])
                if bx > ax and by > ay:
                    out[ay - y:by - y, ax - x:bx - x] = tile[ay - top:by - top, ax - left:bx - left]
        return out

    def close(self) -> None:
        self._file.close()
        with self._lock:
            self._cache.clear()
            self._cached_bytes = 0


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

    Where the level is a page of a tiled TIFF and a strip starts on a whole level pixel, the
    strip is cut from the slide's own decoded tiles (:class:`TiffLevel`, ``direct``), several
    times faster than OpenSlide's painting; the first such strip of each slide is read both
    ways and must match pixel for pixel, else OpenSlide reads the slide (with a warning).

    Each process (the main one or a worker) opens the slide once itself: OpenSlide handles
    are not shared between processes.

    Args:
        path: The slide.
        xy: ``(N, 2)`` level-0 top-left corners, in grid order (row by row, left to right).
        level: Pyramid level to read.
        read_size: Tile side in that level's pixels.
        size: Tile side the model takes; the read tile is resized to it.
        level_downsample: The level's downsample from level 0 (None: asked of the slide).
        direct: Cut strips from the TIFF's own tiles where it can (False: OpenSlide reads
            every strip).
    """

    MAX_RUN = 16

    def __init__(self, path: str | Path, xy: np.ndarray, level: int, read_size: int,
                 size: int, level_downsample: float | None = None, *, direct: bool = True):
        self.path = str(path)
        self.xy = np.asarray(xy, dtype=np.int64).reshape(-1, 2)
        self.level, self.read_size, self.size = level, read_size, size
        self.direct = direct
        self._downsample = level_downsample
        self._slide = None
        self._pid = None
        self._tiff: TiffLevel | None = None
        self._rejected: TiffLevel | None = None  # failed its pixel check; closed by close()
        self._checked = False
        self._check_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.xy)

    def open(self):
        """The slide's handle in this process (opened on first use)."""
        if self._slide is None or self._pid != os.getpid():
            self._slide, self._pid = open_slide(self.path), os.getpid()
            if self._downsample is None:
                self._downsample = float(self._slide.level_downsamples[self.level])
            self._tiff, self._checked = None, False
            self._check_lock = threading.Lock()
            if self.direct:  # None unless the level's downsample is a whole number
                self._tiff = TiffLevel.for_level(self._slide, self.path, self.level)
        return self._slide

    def close(self) -> None:
        """Closes this process's slide handle and TIFF file (opened again on next use)."""
        for tiff in (self._tiff, self._rejected):
            if tiff is not None:
                tiff.close()
        self._rejected = None
        if self._slide is not None:
            self._slide.close()
        self._slide = self._tiff = self._pid = None

    @property
    def reads_direct(self) -> bool:
        """Whether strips are being cut from the TIFF's own tiles (see the class notes)."""
        self.open()
        return self._tiff is not None

    def read(self, i: int) -> Image.Image:
        """Tile ``i`` as an RGB image of ``size`` x ``size`` pixels, read on its own."""
        x, y = (int(v) for v in self.xy[i])
        img = Image.fromarray(np.ascontiguousarray(self._read_openslide(
            x, y, self.read_size, self.read_size)))
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
        self.open()
        rs, size = self.read_size, self.size
        out = np.empty((stop - start, size, size, 3), np.uint8)
        for first, k in self.runs(start, stop):
            x, y = (int(v) for v in self.xy[first])
            rgb = self._read_direct(x, y, k * rs, rs)
            if rgb is None:
                rgb = self._read_openslide(x, y, k * rs, rs)
            if rs == size:
                out[first - start:first - start + k] = rgb.reshape(rs, k, rs, 3).swapaxes(0, 1)
                continue
            for j in range(k):
                tile = Image.fromarray(np.ascontiguousarray(rgb[:, j * rs:(j + 1) * rs]))
                out[first - start + j] = np.asarray(
                    tile.resize((size, size), Image.Resampling.BILINEAR))
        return torch.from_numpy(out).permute(0, 3, 1, 2)

    def _read_openslide(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """``(h, w, 3)`` uint8 RGB of the level, from level-0 ``(x, y)``, by OpenSlide."""
        return read_rgb(self.open(), (x, y), self.level, (w, h), self.path)

    def _read_direct(self, x: int, y: int, w: int, h: int) -> np.ndarray | None:
        """The same region cut from the TIFF's decoded tiles, or None where OpenSlide must
        read it (no TIFF level, not on a whole level pixel, a tile that does not decode)."""
        tiff = self._tiff
        ds = round(self._downsample or 1)
        if tiff is None or x % ds or y % ds:
            return None
        try:
            rgb = tiff.read(x // ds, y // ds, w, h)
        except SlideTooCostly:
            raise
        except Exception:  # noqa: BLE001 - any decoder error (zlib.error...): OpenSlide
            return None  # reads it, and says so if the slide is damaged there
        if not self._checked:
            with self._check_lock:
                if self._tiff is None:  # another lane found other pixels meanwhile
                    return None
                if not self._checked:
                    ref = self._read_openslide(x, y, w, h)
                    if not np.array_equal(ref, rgb):
                        # Closed with the dataset, not now: another lane may be reading it.
                        self._tiff, self._rejected = None, tiff
                        warnings.warn(f"{Path(self.path).name}: its TIFF tiles decode to other "
                                      "pixels than OpenSlide gives; OpenSlide reads this "
                                      "slide (slower).", stacklevel=2)
                        return ref
                    self._checked = True
        return rgb

    def batches_by_index(self, batch_size: int, multiple_of: int = 1) -> _Batches:
        """Batch ``k`` as ``self.batches_by_index(batch_size)[k]``: ``(uint8 tiles,
        indices)``.

        The tiles are cut into the fewest batches of at most ``batch_size`` whose number is
        a multiple of ``multiple_of``, their sizes equal within one: lanes that take batches
        in turn then finish together, instead of one scoring a last batch while the others
        wait (a tenth of the time of a slide of nine batches on two lanes).
        """
        return _Batches(self, batch_size, multiple_of)

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
        return {**self.__dict__, "_slide": None, "_pid": None, "_tiff": None,
                "_rejected": None, "_check_lock": None}


class _Batches(torch.utils.data.Dataset):
    """Batch ``k`` of a :class:`TileDataset` as one item ``(tiles, indices)``, so that a
    DataLoader's workers read whole batches (strips and all)."""

    def __init__(self, tiles: TileDataset, batch_size: int, multiple_of: int = 1):
        self.tiles, self.batch_size = tiles, batch_size
        n = math.ceil(len(tiles) / batch_size)
        n = min(len(tiles), math.ceil(n / multiple_of) * multiple_of)
        # Batch k holds tiles bounds[k]..bounds[k+1]-1.
        self.bounds = [len(tiles) * k // max(n, 1) for k in range(n + 1)]

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= k < len(self):
            raise IndexError(k)
        start, stop = self.bounds[k], self.bounds[k + 1]
        return self.tiles.read_batch(start, stop), torch.arange(start, stop)

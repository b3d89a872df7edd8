"""Reading images safely, and the Dataset that serves an index or split table."""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..errors import UserError
from .batch_augment import new_batch_tensor

DEFAULT_MAX_PIXELS = 100_000_000
"""Images with more pixels are refused before decoding (decompression-bomb guard)."""

ALLOWED_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")
"""The only file formats decoded (Pillow's names). Pillow reads dozens more, some through
external programs (EPS runs Ghostscript) or rarely used decoders; microscope images come in
these."""

_FORMAT_NAMES = "PNG, JPEG, TIFF, BMP or WebP"

MAX_JPEG_SCANS = 256
"""Scans a progressive JPEG may have. Each scan is a pass over the whole image, however few
bytes it takes: 200,000 tiny ones (2.4 MB) keep the decoder busy for half a minute. Ordinary
progressive JPEGs have about 10."""

_SOS = b"\xff\xda"
"""A JPEG's start-of-scan marker. Inside entropy-coded data every 0xFF byte is followed by a
stuffed 0x00 (or an RSTn marker), so these two bytes occur only as markers, or by chance in
metadata (an EXIF thumbnail has its own scans)."""

# EXIF Orientation -> the transposition that shows the image upright (ImageOps.exif_transpose's
# table); 5-8 swap width and height.
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


class ImageError(UserError, ValueError):
    """A file that cannot be used as an image; the message says why."""


class ImageFormatError(ImageError):
    """A file that is not in one of :data:`ALLOWED_FORMATS` (a server answers 415 for it,
    where a damaged image of an allowed format is a plain :class:`ImageError`)."""


def open_rgb(source, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
             reduced: Callable[[int, int], int | None] | None = None) -> Image.Image:
    """Opens an image as 8-bit RGB.

    Grayscale, 16-bit, palette, RGBA/LA (composited on white, like a slide's background) and
    CMYK images are converted. The pixel count is checked from the header, before decoding.
    Files are decoded only in the :data:`ALLOWED_FORMATS`, and turned upright as their EXIF
    Orientation says (as browsers show them; sizes are those of the upright image); a
    progressive JPEG of more than :data:`MAX_JPEG_SCANS` scans is refused before decoding.
    PIL images and arrays, already decoded by the caller, are taken as they are.

    Args:
        source: Path, file object, PIL image or HxW / HxWxC array.
        max_pixels: Refuse larger images; None disables the check.
        reduced: For a JPEG file (not a PIL image): called with its (upright) width and
            height before decoding, returns the side in pixels that both dimensions must
            keep, or None for the full image. The file is then decoded at 1/2, 1/4 or 1/8
            scale (libjpeg's scaled inverse DCT, which skips most of the decoding work) where
            that keeps both sides at least that long. For callers that resize the image down anyway.

    Raises:
        ImageFormatError: a file in another format (GIF, EPS, PSD...) or not an image at all.
        ImageError: unreadable, truncated, too large, or a progressive JPEG of too many
            scans.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    im = source if isinstance(source, Image.Image) else _open_file(source)
    turn = None if im is source else _ORIENTATION.get(_orientation(im))
    w, h = im.size
    if turn in (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270,
                Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90):
        w, h = h, w
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            f"{_name(source)}: {w}x{h} pixels is over the limit of {max_pixels:,} (a possible "
            "decompression bomb); raise the limit (max_pixels / --max-pixels) if it is genuine."
        )
    # MPO: JPEG frames after a first one, which is what Pillow decodes; its scans count too.
    if im.format in ("JPEG", "MPO") and im is not source and (
            im.info.get("progressive") or im.info.get("progression")):
        _refuse_too_many_scans(source, im)
    if reduced is not None and im.format == "JPEG" and im is not source:  # files only
        side = reduced(w, h)
        if side:
            im.draft(None, (side, side))  # the largest scale that keeps both sides >= side
    rgb = _decode_rgb(source, im)
    return rgb if turn is None else rgb.transpose(turn)


def _open_file(source) -> Image.Image:
    """Opens (without decoding) a path or file object in one of :data:`ALLOWED_FORMATS`.

    Raises:
        ImageFormatError: a file in another format or not an image at all.
        ImageError: a damaged file of an allowed format, a missing file, a header of more
            pixels than Pillow decodes, or any other reason it cannot be read.
    """
    try:
        with warnings.catch_warnings():
            # PIL's own bomb warning fires at a fixed size; our limit is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(source, formats=ALLOWED_FORMATS)
    except Image.UnidentifiedImageError as e:
        kind = _looks_allowed(source)
        if kind is not None:
            raise ImageError(f"{_name(source)}: starts like a {kind} "
                             "file but cannot be read; it is damaged. Use the original "
                             "image.") from e
        raise ImageFormatError(
            f"{_name(source)}: not a {_FORMAT_NAMES} image, the formats accepted; convert "
            "it to PNG or TIFF (other formats are refused unread, as some run external "
            "programs when decoded).") from e
    except FileNotFoundError as e:
        raise ImageError(f"{_name(source)}: no such file.") from e
    except Image.DecompressionBombError as e:
        raise ImageError(
            f"{_name(source)}: refused before decoding, its header claims more pixels than "
            f"Pillow will ever decode ({e}). A genuine image this large must be cut into "
            "tiles first.") from e
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise ImageError(f"{_name(source)}: not a readable image ({type(e).__name__}: {e})"
                         ) from e


def _refuse_too_many_scans(source, im: Image.Image) -> None:
    """Raises an :class:`ImageError` for a progressive JPEG of more than
    :data:`MAX_JPEG_SCANS` scans, before it is decoded."""
    scans = _count_scans(im, MAX_JPEG_SCANS)
    if scans > MAX_JPEG_SCANS:
        raise ImageError(
            f"{_name(source)}: a progressive JPEG of more than {MAX_JPEG_SCANS} scans "
            f"(ordinary ones have about 10), refused before decoding: each scan is a pass "
            "over the whole image, so it would hold the decoder for minutes. Re-save it as "
            "a baseline (non-progressive) JPEG or as PNG.")


def _decode_rgb(source, im: Image.Image) -> Image.Image:
    """Decodes an opened image (a PNG on the fast path where it can) into 8-bit RGB."""
    fast = _decode_png(source, im)
    if fast is None:
        try:
            im.load()
        except Exception as e:  # noqa: BLE001
            raise ImageError(f"{_name(source)}: cannot decode ({type(e).__name__}: {e})"
                             ) from e
    return fast if fast is not None else _to_rgb(im)


def _orientation(im: Image.Image) -> int:
    """The EXIF Orientation of an opened file (1: upright), read without decoding: a PNG's
    only from an eXIf chunk before its pixels (Pillow would decode the image to look for one
    after them)."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(0x0112, 1)  # ExifTags.Base.Orientation
        return int(value) if isinstance(value, int) else 1
    except Exception:  # noqa: BLE001 - damaged metadata: the pixels as they are
        return 1


def _count_scans(im: Image.Image, limit: int) -> int:
    """The start-of-scan markers in an opened JPEG file, counted up to ``limit + 1`` (then it
    stops), read in chunks from the start of the file Pillow opened (``Image.open`` reads
    from there too), which is left where it was."""
    f = im.fp
    position = f.tell()
    count, tail = 0, b""
    try:
        f.seek(0)
        while count <= limit and (chunk := f.read(1 << 20)):
            # A marker split across two chunks is counted once: ``tail`` is one byte.
            count += (tail + chunk).count(_SOS)
            tail = chunk[-1:]
    finally:
        f.seek(position)
    return count


@functools.cache
def _png_decoder() -> tuple[str, Callable[[bytes], np.ndarray]]:
    """The fastest PNG decoder at hand, as ``(name, bytes -> (H, W, C) uint8)``.

    imagecodecs (``pip install imagecodecs``, Python 3.11+: libpng with a faster inflate) when
    it is installed, else torchvision's libpng decoder, which comes with the project. Both
    decode a BreakHis PNG to Pillow's pixels in less time than Pillow (docs/benchmarks.md,
    "Training loader").
    """
    try:
        import imagecodecs

        return "imagecodecs", imagecodecs.png_decode
    except ImportError:
        from torchvision.io import ImageReadMode, decode_png

        def decode(data: bytes) -> np.ndarray:
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return decode_png(raw, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()

        return "torchvision", decode


def _decode_png(source, im: Image.Image) -> Image.Image | None:
    """An 8-bit RGB PNG file (``source`` a path; ``im`` its header, already checked) decoded
    with :func:`_png_decoder`, or None to leave it to Pillow: other modes (palette, alpha,
    16-bit, grey), file objects (uploads), files larger than their pixels (bulky metadata
    chunks: the file is read whole here), and any file the fast decoder refuses or reads to
    another shape, so that a damaged file gets Pillow's error message."""
    if im.format != "PNG" or im.mode != "RGB" or not isinstance(source, (str, Path)):
        return None
    if Path(source).stat().st_size > 3 * im.width * im.height + (1 << 20):
        return None
    try:
        arr = _png_decoder()[1](Path(source).read_bytes())
    except Exception:  # noqa: BLE001 - Pillow reads it again and names the problem
        return None
    if arr.shape != (im.height, im.width, 3) or arr.dtype != np.uint8:
        return None
    im.close()
    return Image.fromarray(arr)


def _looks_allowed(source) -> str | None:
    """The allowed format whose signature the file starts with, by Pillow's own checks."""
    try:
        if isinstance(source, (str, Path)):
            with open(source, "rb") as f:
                prefix = f.read(16)
        else:
            position = source.tell()
            source.seek(0)
            prefix = source.read(16)
            source.seek(position)
    except Exception:  # noqa: BLE001 - unreadable or unseekable: nothing to go on
        return None
    Image.init()
    for fmt in ALLOWED_FORMATS:
        accept = Image.OPEN[fmt][1] if fmt in Image.OPEN else None
        # A str answer is Pillow's "would be this format, but the decoder is missing".
        if accept is not None and accept(prefix) is True:
            return fmt
    return None


def _name(source) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return str(getattr(source, "name", "<image>"))  # an open file knows its path


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # One float32 copy, scaled in place: float64 temporaries cost ~23 bytes a pixel,
        # several times what the pixel budget allows for.
        arr = np.array(im, dtype=np.float32)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr /= hi
        arr *= 255.0
        np.clip(arr, 0, 255, out=arr)
        return _array_to_rgb(arr.astype(np.uint8))
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        if im.getextrema()[3][0] == 255:
            return im.convert("RGB")  # opaque: nothing to composite
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def _array_to_rgb(arr: np.ndarray) -> Image.Image:
    if arr.dtype == np.uint16:
        arr = (arr / 257.0).round().astype(np.uint8)
    elif arr.dtype.kind == "f":
        # Float arrays are taken as [0, 1] images, as matplotlib and torchvision treat them.
        arr = (np.clip(arr, 0, 1) * 255.0).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        return Image.fromarray(arr, "L").convert("RGB")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return _to_rgb(Image.fromarray(arr, "RGB" if arr.shape[2] == 3 else "RGBA"))
    raise ImageError(f"array of shape {arr.shape} is not an HxW or HxWx3/4 image")


def run_lanes(lanes: int, units: int, work: Callable[[int], int], bar=None) -> None:
    """Calls ``work(k)`` for every ``k < units`` from ``lanes`` threads (this one among them),
    each taking the next unit when it is done with its last; ``work`` returns how many items
    it did, which advance the tqdm ``bar``.

    For read-then-score work on a CPU of few cores: each lane reads its batch and scores it
    with a model run on its share of the cores, so one lane's reading overlaps the other's
    scoring without stalling a model that would use every core. An exception in any lane
    stops the others after their unit in hand and is raised here (this thread being a lane,
    Ctrl-C reaches it).
    """
    lock, stop, failed = threading.Lock(), threading.Event(), []
    order = iter(range(units))

    def lane() -> None:
        try:
            while not stop.is_set():
                with lock:
                    k = next(order, None)
                if k is None:
                    return
                done = work(k)
                if bar is not None:
                    with lock:
                        bar.update(done)
        except BaseException as e:  # noqa: BLE001 - raised in the caller
            failed.append(e)
            stop.set()

    others = [threading.Thread(target=lane, name=f"bcd-lane-{i}", daemon=True)
              for i in range(1, lanes)]
    for t in others:
        t.start()
    try:
        lane()
    finally:
        stop.set()
        for t in others:
            t.join()
    if failed:
        raise failed[0]


def split_key(key: int | tuple[int, int]) -> tuple[int, int | None]:
    """A dataset key as ``(row, seed)``: EpochSampler hands out pairs, plain loaders rows."""
    return key if isinstance(key, tuple) else (key, None)


def transform_seeded(transform: Callable, image, seed: int | None):
    """``transform(image)``, drawing its randomness from ``seed`` when one is given.

    The augmentation of a sample then depends on (seed, epoch, position) only, not on the
    worker count, the rank, or where a run resumed; the caller's RNG is left untouched.
    """
    if seed is None:
        return transform(image)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


class ImageTableDataset(torch.utils.data.Dataset):
    """Serves ``(image, target, row)`` for the rows of an index or split table.

    An unreadable image yields ``None`` instead of raising, so one bad file does not end a
    long run: :func:`collate_skip_bad` drops it and reports its path to the training loop.
    """

    def __init__(self, root: str | Path, table: pd.DataFrame, transform: Callable,
                 *, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.root = Path(root)
        self.paths = table["path"].tolist()
        self.targets = [int(t) for t in table["target"]]
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]):
        i, seed = split_key(key)
        try:
            image = open_rgb(self.root / self.paths[i], max_pixels=self.max_pixels)
        except (ImageError, OSError) as e:
            return None, i, str(e)
        return transform_seeded(self.transform, image, seed), self.targets[i], i


def _stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` into shared memory in a DataLoader worker, keeping channels-last layout
    for CHW views of HWC pixels.

    The cache serves uint8 images as CHW views of its HWC rows; stacking them as HWC is a
    plain copy (stacking the views transposes every pixel) and gives the channels-last batch
    that ``BatchAugment``'s CPU resize reads fastest.
    """
    first = images[0]
    if all(t.dim() == 3 and t.stride(0) == 1 and t.shape[0] > 1 for t in images):
        hwc = [t.permute(1, 2, 0) for t in images]
        out = new_batch_tensor((len(hwc), *hwc[0].shape), first.device, first.dtype)
        return torch.stack(hwc, out=out).permute(0, 3, 1, 2)
    out = new_batch_tensor((len(images), *first.shape), first.device, first.dtype)
    return torch.stack(images, out=out)


def collate_skip_bad(batch: list) -> dict:
    """Stacks the good samples of a batch and lists the bad ones as ``(row, reason)``."""
    good = [b for b in batch if b[0] is not None]
    bad = [(b[1], b[2]) for b in batch if b[0] is None]
    if not good:
        return {"x": None, "y": None, "rows": None, "bad": bad}
    return {
        "x": _stack_images([b[0] for b in good]),
        "y": torch.tensor([b[1] for b in good], dtype=torch.long),
        "rows": torch.tensor([b[2] for b in good], dtype=torch.long),
        "bad": bad,
    }


_STREAMS = {"epoch": 1, "samples": 10_000_019, "batches": 100_003, "loader": 7919}


def run_seed(seed: int, epoch: int, stream: str = "epoch") -> int:
    """The seed of one random stream of one epoch of a run.

    Every random draw of training (sample order, per-sample augmentation, whole-batch
    augmentation, loader workers) is seeded from (run seed, epoch, stream) alone, never from a
    generator's running state: that is what lets a resumed run draw exactly what an
    uninterrupted one would have. Streams: ``epoch`` (order; the process's torch seed),
    ``samples`` (per-sample seeds are this + position), ``batches`` (batch k: this + k),
    ``loader`` (the DataLoader's generator).
    """
    return (seed * 1_000_003 + epoch) * _STREAMS[stream]


def patient_balanced_weights(targets: np.ndarray, patients: np.ndarray) -> np.ndarray:
    """Sampling weights under which each class draws half the images and, within a class,
    each patient an equal share, however many images the patient has. An image without a
    patient id counts as a patient of its own.

    BreakHis patients hold from 1 to over 100 images each; drawn uniformly, a few patients
    make most of every epoch and the model learns them rather than the classes.
    """
    targets = np.asarray(targets).astype(int)
    ids = np.asarray(patients).astype(str)
    ids = np.where(ids == "", np.char.add("image-", np.arange(len(ids)).astype(str)), ids)
    table = pd.DataFrame({"t": targets, "p": ids})
    images = table.groupby("p")["t"].transform("size").to_numpy()
    patients_of_class = table.groupby("t")["p"].transform("nunique").to_numpy()
    classes = table["t"].nunique()
    return 1.0 / (classes * patients_of_class * images)


class EpochSampler(torch.utils.data.Sampler):
    """The sample order of one epoch, fixed by (seed, epoch), sharded over ranks.

    Yields ``(row, sample_seed)``. Fixing order and augmentation seeds by epoch number and
    position (rather than by a generator's running state) is what lets a resumed run see
    exactly the batches, augmented exactly as, an uninterrupted one would have. ``start``
    skips the samples already trained in an interrupted epoch. Shards are padded to equal
    length and interleaved, as DistributedSampler does.
    """

    def __init__(self, n: int, *, seed: int, epoch: int, shuffle: bool = True,
                 weights: torch.Tensor | None = None, rank: int = 0, world: int = 1,
                 start: int = 0):
        g = torch.Generator().manual_seed(run_seed(seed, epoch))
        if weights is not None:
            order = torch.multinomial(weights, n, replacement=True, generator=g)
        elif shuffle:
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if world > 1 and shuffle:
            pad = (-n) % world
            order = torch.cat([order, order[:pad]])
        base = run_seed(seed, epoch, "samples")
        seeds = base + torch.arange(len(order))
        self.indices = list(zip(order[rank::world][start:].tolist(),
                                seeds[rank::world][start:].tolist()))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

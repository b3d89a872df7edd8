"""Images decoded and resized once into a memory-mapped array, so training never waits on PNGs.

``bcd prepare ROOT --size S`` (:func:`prepare_cache`) writes ``data/cache/<name>-<hash>-<S>px/``
under the current folder: ``images.npy``, one uint8 ``(N, H, W, 3)`` array, and
``manifest.json``, which records each source file's size and modification time. Training looks
the cache up with :func:`find_cache` and serves it through :class:`CachedImageDataset`; a cache
that no longer matches the files is never used.

The resize follows the rule of the evaluation transform (torchvision ``Resize(S)`` on a PIL
image: bilinear, antialiased by PIL, short side ``S``, long side ``int(S * long / short)``), so
evaluating a cache made with ``--size`` equal to ``Preprocessing.resize`` gives exactly the
tensors the files give. Training crops come from the cached image instead of the full-size
file, which lowers the resolution they are cut from: with the default crop scale (0.35 of the
area, aspect 3/4..4/3), a 224 px crop is upsampled from as little as ``0.63 * S`` pixels, so
``S >= 360`` avoids upsampling on BreakHis, and ``S = 256`` upsamples by up to 1.4x.

Size on disk is ``N * H * W * 3`` bytes: BreakHis at 256 px is 7,909 x 256 x 389 x 3 = 2.4 GB.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..errors import UserError
from .breakhis import DatasetError
from .datasets import DEFAULT_MAX_PIXELS, ImageError, open_rgb, split_key, transform_seeded

CACHE_VERSION = 2
"""Bumped whenever the layout, the resize rule or the decoding changes; older caches then
count as stale (2: images turned upright by their EXIF orientation, as predictions see them)."""

MANIFEST = "manifest.json"
ARRAY = "images.npy"
RESAMPLE = Image.Resampling.BILINEAR
"""PIL's bilinear filter, which widens its support when downscaling (antialiased), as
torchvision's ``Resize`` uses on PIL images."""


class StaleCacheError(UserError):
    """A prepared cache that is missing, unfinished, from another version, or out of date."""


class StaleCacheWarning(UserWarning):
    """:func:`find_cache` found a cache it cannot use; training decodes the files instead."""


def default_cache_dir(root: str | Path, size: int) -> Path:
    """Where ``bcd prepare ROOT --size S`` puts its cache, and where training looks for it.

    The folder is ``data/cache/<root folder name>-<8 hex of sha256(resolved root)>-<size>px``
    under the current working directory, not under ``root``, which may be read-only (a shared
    mount); the hash keeps two data sets with the same folder name apart.
    """
    resolved = Path(root).resolve()
    digest = sha256(str(resolved).encode()).hexdigest()[:8]
    return Path.cwd() / "data" / "cache" / f"{resolved.name}-{digest}-{int(size)}px"


def _output_shape(ref_wh: tuple[int, int], size: int) -> tuple[int, int]:
    """Height and width with short side ``size``, the long side truncated as torchvision does."""
    w, h = ref_wh
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    return (size, new_long) if h <= w else (new_long, size)


def _fit(im: Image.Image, out_hw: tuple[int, int], ref_wh: tuple[int, int]) -> Image.Image:
    """Resize to ``out_hw``; an image of another aspect ratio than ``ref_wh`` is first
    centre-cropped to that aspect, so nothing is stretched."""
    out_h, out_w = out_hw
    w, h = im.size
    rw, rh = ref_wh
    box = None
    if w * rh > h * rw:  # wider than the reference: trim left and right
        cw = h * rw / rh
        box = ((w - cw) / 2, 0.0, (w + cw) / 2, float(h))
    elif w * rh < h * rw:  # taller: trim top and bottom
        ch = w * rh / rw
        box = (0.0, (h - ch) / 2, float(w), (h + ch) / 2)
    return im.resize((out_w, out_h), RESAMPLE, box=box)


# Set in each decoding process by _init_worker: the array being written and the target shape.
_STATE: dict[str, Any] = {}


def _init_worker(npy: str, out_hw: tuple[int, int], ref_wh: tuple[int, int],
                 max_pixels: int | None) -> None:
    _STATE.update(array=np.load(npy, mmap_mode="r+"), out_hw=out_hw, ref_wh=ref_wh,
                  max_pixels=max_pixels)


def _decode_one(task: tuple[int, str]) -> tuple[int, str | None]:
    """Decodes one image into its row of the array; returns the row and the reason it is bad."""
    row, path = task
    try:
        im = open_rgb(path, max_pixels=_STATE["max_pixels"])
        arr = np.asarray(_fit(im, _STATE["out_hw"], _STATE["ref_wh"]))
    except (ImageError, OSError) as e:
        return row, str(e)
    _STATE["array"][row] = arr
    return row, None


def _scan(root: Path, paths: list[str]) -> tuple[list[dict], dict[str, str], Counter]:
    """Stats every file and reads its image header (cheap: no decoding)."""
    records, bad, shapes = [], {}, Counter()
    for rel in paths:
        p = root / rel
        try:
            st = p.stat()
        except OSError as e:
            raise DatasetError(f"{p}: listed in the index but cannot be read ({e}). Index "
                               "the folder again (`bcd index ROOT`).") from e
        records.append({"path": rel, "file_size": st.st_size, "mtime_ns": st.st_mtime_ns})
        if st.st_size == 0:
            bad[rel] = f"{p}: empty file"
            continue
        try:
            with Image.open(p) as im:
                shapes[im.size] += 1
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            bad[rel] = f"{p}: not a readable image ({type(e).__name__}: {e})"
    return records, bad, shapes


def prepare_cache(root: str | Path, index: pd.DataFrame, size: int,
                  out: str | Path | None = None, *, progress: bool = True,
                  workers: int = 2, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Path:
    """Decodes every image of ``index`` once into a memory-mappable cache.

    Every image is resized (PIL bilinear, antialiased) so that its short side is ``size``,
    keeping the aspect ratio of the data set's most common image shape (BreakHis: 700x460 ->
    389x256 at ``size=256``); an image of another aspect ratio is centre-cropped to that aspect
    first. The array is written under a temporary name and renamed when complete, and the
    manifest is written last, so an interrupted run never leaves a cache that looks usable.
    An existing cache in ``out`` is invalidated (its manifest removed) before the rebuild.

    Unreadable images do not stop the build: they are listed under ``"bad"`` in the manifest
    with the reason, their rows stay zero, and :class:`CachedImageDataset` serves them as bad
    samples.

    Args:
        root: Data folder the ``path`` column is relative to.
        index: Table with a ``path`` column (an index or split table); repeated paths are
            stored once.
        size: Short side of the cached images, in pixels.
        out: Cache folder; None uses :func:`default_cache_dir`.
        progress: Show a progress bar.
        workers: Decoding processes; 0 or 1 decodes in this process.
        max_pixels: Refuse larger images (decompression-bomb guard); None disables.

    Returns:
        The cache folder.

    Raises:
        DatasetError: an indexed file is missing.
        UserError: ``size`` is not positive, or no image could be read.
    """
    size = int(size)
    if size < 1:
        raise UserError(f"--size {size}: the cache's short side must be a positive number of "
                        "pixels, e.g. --size 256.")
    root = Path(root).resolve()
    out = Path(out) if out is not None else default_cache_dir(root, size)
    paths = list(dict.fromkeys(index["path"].tolist()))
    if not paths:
        raise UserError(f"{root}: the index is empty; nothing to cache.")

    records, bad, shapes = _scan(root, paths)
    if not shapes:
        raise UserError(f"{root}: none of the {len(paths)} indexed images can be read; "
                        "check them with `bcd index ROOT --verify`.")
    ref_wh = shapes.most_common(1)[0][0]
    out_hw = _output_shape(ref_wh, size)
    shape = (len(paths), *out_hw, 3)

    out.mkdir(parents=True, exist_ok=True)
    # The old manifest goes first: from here until the new one is written, no cache is valid.
    (out / MANIFEST).unlink(missing_ok=True)
    seconds = _write_array(out, root, paths, bad, shape, (out_hw, ref_wh, max_pixels),
                           workers=workers, progress=progress)
    _write_manifest(out, {
        "version": CACHE_VERSION,
        "size": size,
        "shape": list(shape),
        "reference_shape": list(ref_wh),
        "resample": "PIL bilinear (antialiased), short side = size, long side truncated",
        "root": str(root),
        "seconds": round(seconds, 3),
        "images": records,
        "bad": {p: bad[p] for p in paths if p in bad},
    })
    return out


def _write_array(out: Path, root: Path, paths: list[str], bad: dict[str, str],
                 shape: tuple[int, ...],
                 geometry: tuple[tuple[int, int], tuple[int, int], int | None], *,
                 workers: int, progress: bool) -> float:
    """Decodes the images into the cache's array, written under a temporary name and renamed
    when complete (removed when anything goes wrong). Adds the images that could not be
    decoded to ``bad``; returns the seconds the decoding took.

    Raises:
        UserError: no image could be decoded.
    """
    tmp = out / f"{ARRAY}.{os.getpid()}.partial"
    start = time.perf_counter()
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        del arr  # the decoders map the file themselves; unwritten rows read as zeros
        bad.update(_decode_into(tmp, root, paths, bad, geometry, workers=workers,
                                progress=progress))
        seconds = time.perf_counter() - start
        if len(bad) == len(paths):
            raise UserError(f"{root}: none of the {len(paths)} indexed images can be decoded; "
                            "check them with `bcd index ROOT --verify`.")
        np.load(tmp, mmap_mode="r+").flush()
        os.replace(tmp, out / ARRAY)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return seconds


def _decode_into(npy: Path, root: Path, paths: list[str], bad: dict[str, str],
                 geometry: tuple[tuple[int, int], tuple[int, int], int | None], *,
                 workers: int, progress: bool) -> dict[str, str]:
    """Decodes every image of ``paths`` not already ``bad`` into its row of the array file
    ``npy``, in this process (``workers`` 0 or 1) or a pool; ``geometry`` is ``(out_hw,
    ref_wh, max_pixels)``. Returns the images that could not be decoded, with the reason."""
    from tqdm.auto import tqdm

    tasks = [(i, str(root / rel)) for i, rel in enumerate(paths) if rel not in bad]
    init = (str(npy), *geometry)
    bar = tqdm(total=len(paths), desc="prepare", unit="img", disable=not progress,
               initial=len(paths) - len(tasks))
    with bar:
        if workers <= 1:
            _init_worker(*init)
            try:
                results = (_decode_one(t) for t in tasks)
                return _collect(results, paths, bar)
            finally:
                _STATE.clear()
        import multiprocessing as mp

        with mp.get_context().Pool(workers, _init_worker, init) as pool:
            results = pool.imap_unordered(_decode_one, tasks, chunksize=8)
            return _collect(results, paths, bar)


def _write_manifest(out: Path, manifest: dict) -> None:
    """Writes the cache's manifest under a temporary name and renames it into place, last, so
    that a cache is valid only once complete."""
    tmp_manifest = out / f"{MANIFEST}.{os.getpid()}.partial"
    tmp_manifest.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp_manifest, out / MANIFEST)


def _collect(results, paths: list[str], bar) -> dict[str, str]:
    bad = {}
    for row, reason in results:
        if reason is not None:
            bad[paths[row]] = reason
        bar.update(1)
    return bad


def _fix(root: str | Path, size: int | str) -> str:
    return f"run `bcd prepare {root} --size {size}` again"


def open_cache(cache_dir: str | Path, root: str | Path, index: pd.DataFrame) -> ImageCache:
    """Opens a prepared cache after checking that it still matches the index and the files.

    The cache must hold every path of the index (in any order; repeats are ignored; it may
    hold more, e.g. when the index is one subset of a split), and each of those files under
    ``root`` must have the size and modification time it had when the cache was made.
    ``root`` may differ from the folder the cache was made from (a moved copy or another
    mount point): the files themselves decide.

    Raises:
        StaleCacheError: the cache is missing, unfinished, from another version, or differs
            from the index or the files; the message names the first difference and the fix.
    """
    cache_dir = Path(cache_dir)
    manifest_path = cache_dir / MANIFEST
    if not manifest_path.is_file():
        raise StaleCacheError(
            f"{cache_dir}: no finished cache here ({MANIFEST} is missing); "
            f"{_fix(root, 'SIZE')} (a build that was interrupted leaves no manifest).")
    try:
        manifest = json.loads(manifest_path.read_text())
        size = int(manifest["size"])
        version = manifest["version"]
        records = manifest["images"]
    except (ValueError, KeyError, TypeError) as e:
        raise StaleCacheError(f"{manifest_path}: unreadable manifest ({e}); "
                              f"{_fix(root, 'SIZE')}.") from e
    fix = _fix(root, size)
    if version != CACHE_VERSION:
        raise StaleCacheError(f"{cache_dir}: cache format version {version}, this bcd reads "
                              f"version {CACHE_VERSION}; {fix}.")

    cached = {r["path"]: r for r in records}
    wanted = list(dict.fromkeys(index["path"].tolist()))
    for p in wanted:
        if p not in cached:
            raise StaleCacheError(f"{cache_dir} is stale: {p} is in the index but not in the "
                                  f"cache; {fix}.")
    rootp = Path(root)
    # Only the images asked for are checked: a split or a magnification filter reads a subset
    # of what was cached, and cached images it does not read cannot be served stale.
    for p in wanted:
        r = cached[p]
        f = rootp / p
        try:
            st = f.stat()
        except OSError:
            raise StaleCacheError(f"{cache_dir} is stale: {f} no longer exists; {fix}.") from None
        if st.st_size != r["file_size"]:
            raise StaleCacheError(f"{cache_dir} is stale: {f} is {st.st_size} bytes, was "
                                  f"{r['file_size']} when cached; {fix}.")
        if st.st_mtime_ns != r["mtime_ns"]:
            raise StaleCacheError(f"{cache_dir} is stale: {f} was modified after it was "
                                  f"cached; {fix}.")
    npy = cache_dir / ARRAY
    try:
        got = tuple(np.load(npy, mmap_mode="r").shape)
    except (OSError, ValueError) as e:
        raise StaleCacheError(f"{npy}: cannot be read ({e}); {fix}.") from e
    if got != tuple(manifest["shape"]):
        raise StaleCacheError(f"{npy}: shape {got} does not match the manifest's "
                              f"{tuple(manifest['shape'])}; {fix}.")
    return ImageCache(cache_dir, manifest)


def check_cache(root: str | Path, index: pd.DataFrame, size: int,
                cache_dir: str | Path | None = None) -> tuple[ImageCache | None, str | None]:
    """The fresh cache of ``root`` at ``size`` px, or why there is none to use.

    Args: as :func:`find_cache`.

    Returns:
        ``(cache, None)`` for a fresh cache; ``(None, why)`` for one that is stale, unfinished
        or of another size (``why`` says what is wrong, then, after "; ", how to fix it);
        ``(None, None)`` when none was prepared.
    """
    d = Path(cache_dir) if cache_dir is not None else default_cache_dir(root, size)
    if not d.is_dir():
        return None, None
    try:
        cache = open_cache(d, root, index)
    except StaleCacheError as e:
        return None, str(e)
    if cache.size != int(size):
        return None, f"{d} holds {cache.size} px images, not {size} px; {_fix(root, size)}."
    return cache, None


def find_cache(root: str | Path, index: pd.DataFrame, size: int,
               cache_dir: str | Path | None = None) -> ImageCache | None:
    """The fresh cache of ``root`` at ``size`` px, if one was prepared.

    Args:
        root: Data folder.
        index: The table training will read (its paths must all be cached).
        size: Short side the cache was prepared at.
        cache_dir: Where to look; None looks in :func:`default_cache_dir`.

    Returns:
        The cache; None when there is none, or when it is stale, unfinished or of another
        size, in which case a :class:`StaleCacheWarning` says why and callers decode the files.
    """
    cache, why = check_cache(root, index, size, cache_dir)
    if why is not None:
        warnings.warn(f"not using the image cache: {why}", StaleCacheWarning, stacklevel=2)
    return cache


class ImageCache:
    """A prepared cache: the image array (memory-mapped on first use) and what it holds.

    Pickling drops the mapping, so each DataLoader worker maps the file itself instead of
    receiving a copy of the whole array.

    Attributes:
        cache_dir: The cache folder.
        size: Short side of the cached images.
        shape: ``(N, H, W, 3)``.
        bad: Relative path -> why the image could not be decoded.
        paths: Relative paths, in the order of the array's rows.
    """

    def __init__(self, cache_dir: str | Path, manifest: dict[str, Any]):
        self.cache_dir = Path(cache_dir)
        self.size = int(manifest["size"])
        self.shape = tuple(int(s) for s in manifest["shape"])
        self.bad = dict(manifest.get("bad", {}))
        self.paths = [r["path"] for r in manifest["images"]]
        self._rows = {p: i for i, p in enumerate(self.paths)}
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ImageCache({str(self.cache_dir)!r}, shape={self.shape}, bad={len(self.bad)})"

    def rows_for(self, paths: list[str]) -> np.ndarray:
        """Rows of the array holding the given relative paths.

        Raises:
            KeyError: a path is not in the cache; the message names it.
        """
        try:
            return np.array([self._rows[p] for p in paths], dtype=np.int64)
        except KeyError as e:
            raise KeyError(f"{e.args[0]} is not in the cache {self.cache_dir}; prepare the "
                           "cache from the same data folder (`bcd prepare ROOT --size "
                           f"{self.size}`).") from None

    def array(self) -> np.ndarray:
        """The read-only ``(N, H, W, 3)`` uint8 memmap, mapped on first use."""
        if self._array is None:
            self._array = np.load(self.cache_dir / ARRAY, mmap_mode="r")
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # A memmap pickles as a full in-memory copy; each process maps the file instead.
        state["_array"] = None
        return state


class CachedImageDataset(torch.utils.data.Dataset):
    """Serves the rows of an index or split table from a prepared cache.

    The item protocol is :class:`~.datasets.ImageTableDataset`'s: the key is a row or
    ``(row, seed)``, the item ``(image, target, row)``, or ``(None, row, reason)`` for an image
    the cache could not decode, so :func:`~.datasets.collate_skip_bad` and
    :class:`~.datasets.EpochSampler` work unchanged.

    Args:
        cache: The opened cache (see :func:`find_cache`).
        table: Rows to serve; every ``path`` must be in the cache.
        transform: The per-image PIL pipeline (``build_train_transform`` or
            ``build_eval_transform``); required unless ``as_uint8``.
        as_uint8: Serve the cached pixels as a uint8 ``(3, H, W)`` tensor with no transform,
            for batched augmentation on the device (``BatchAugment`` / ``BatchEval``).
    """

    def __init__(self, cache: ImageCache, table: pd.DataFrame,
                 transform: Callable | None = None, *, as_uint8: bool = False):
        if as_uint8 and transform is not None:
            raise ValueError("as_uint8=True serves raw pixels for a batch transform applied "
                             "later; pass transform=None.")
        if not as_uint8 and transform is None:
            raise ValueError("pass a transform (build_train_transform / build_eval_transform), "
                             "or as_uint8=True for batched augmentation.")
        self.cache = cache
        self.paths = table["path"].tolist()
        self.targets = [int(t) for t in table["target"]]
        self.rows = cache.rows_for(self.paths)
        self.transform = transform
        self.as_uint8 = as_uint8

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]):
        i, seed = split_key(key)
        path = self.paths[i]
        if path in self.cache.bad:
            return None, i, self.cache.bad[path]
        pixels = np.asarray(self.cache.array()[self.rows[i]])
        if self.as_uint8:
            # Copied out of the read-only mapping: torch must own writable memory.
            return torch.from_numpy(pixels.copy()).permute(2, 0, 1), self.targets[i], i
        return transform_seeded(self.transform, Image.fromarray(pixels), seed), self.targets[i], i

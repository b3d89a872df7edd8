"""Writing slides: any large RGB image as a pyramidal tiled TIFF that OpenSlide opens, and a
demonstration slide (a disc of tumour patches in normal tissue, on white glass)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

# The PatchCamelyon scale: 96 px patches at 0.972 um/px (10x).
PCAM_MPP = 0.972
PCAM_SIZE = 96


def write_slide(path: str | Path, image: np.ndarray, *, mpp: float | None,
                tile: int = 256, min_side: int = 256, compression: str = "zlib") -> Path:
    """Writes ``image`` as a pyramidal tiled TIFF (generic TIFF for OpenSlide).

    Level 0 is the image; each further level halves it until its short side is under
    ``min_side``. Levels after the first are marked reduced-resolution (NewSubfileType 1) and
    every level carries its resolution in pixels per centimetre, from which OpenSlide reads
    ``openslide.mpp-x``/``-y``.

    Args:
        path: The ``.tif`` to write.
        image: ``(H, W, 3)`` uint8 RGB.
        mpp: Micrometres per level-0 pixel; None writes no resolution (a slide of unknown
            scale).
        tile: TIFF tile side (a multiple of 16).
        min_side: Stop halving below this short side.
        compression: A tifffile compression (``zlib`` needs no extra package; ``jpeg``, what
            scanners write, needs imagecodecs).
    """
    import tifffile

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: (H, W, 3) uint8 RGB, not {image.shape} {image.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    level, downsample = np.ascontiguousarray(image), 1
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tw:
        while True:
            kw = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * downsample)
                kw = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tw.write(level, tile=(tile, tile), photometric="rgb", compression=compression,
                     subfiletype=1 if downsample > 1 else 0, metadata=None, **kw)
            if min(level.shape[:2]) // 2 < min_side:
                break
            level = np.asarray(Image.fromarray(level).reduce(2))
            downsample *= 2
    return path


def _synthetic_patch(rng: np.random.Generator, tumour: bool, size: int) -> np.ndarray:
    """An H&E-coloured texture: pink stroma with scattered nuclei, denser and darker for
    tumour. Not tissue: for demonstrations and tests that need no real data."""
    base = np.array([236, 170, 200] if not tumour else [200, 120, 180], float)
    img = base + rng.normal(0, 8, (size, size, 3))
    n = rng.integers(8, 14) if not tumour else rng.integers(30, 45)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(n):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(2, 4) if not tumour else rng.uniform(3, 6)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[blob] = [95, 60, 140]
    return np.clip(img, 0, 255).astype(np.uint8)


_CLASS_FOLDERS = {0: ("0", "normal"), 1: ("1", "tumor", "tumour")}


def _patch_files(root: Path, label: int) -> list[Path]:
    """The patch images of one class: ``0/`` or ``normal/``; ``1/``, ``tumor/`` or
    ``tumour/``."""
    folder = next((root / n for n in _CLASS_FOLDERS[label] if (root / n).is_dir()), None)
    if folder is None:
        raise FileNotFoundError(f"{root}: no {' or '.join(_CLASS_FOLDERS[label])} folder of "
                                "patch images")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif", ".tiff"))
    if not files:
        raise FileNotFoundError(f"{folder}: no patch images")
    return files


def demo_slide(path: str | Path, *, grid: tuple[int, int] = (16, 20),
               patches: str | Path | None = None, tumour: bool = True,
               tumour_radius: float = 0.3, upscale: int = 2, mpp: float | None = PCAM_MPP / 2,
               seed: int = 0, compression: str = "zlib") -> pd.DataFrame:
    """Writes a small slide of known ground truth and returns it.

    A ``rows x cols`` grid of 96 px cells at the PatchCamelyon scale (0.972 um/px), written
    ``upscale`` times larger at level 0: an ellipse of tissue inside a white margin of glass,
    with (``tumour=True``) a disc of tumour cells at its centre.

    Args:
        path: The ``.tif`` to write.
        grid: ``(rows, cols)`` cells.
        patches: A folder with ``0/`` (or ``normal/``) and ``1/`` (or ``tumor/``) 96 px
            patches (the PatchCamelyon layout; ``bcd.SAMPLE_PATCHES`` is one) to draw the
            cells from; None draws synthetic textures.
        tumour: Put the tumour disc in.
        tumour_radius: Its radius as a share of the tissue's short half-axis.
        upscale: Level-0 pixels per PatchCamelyon pixel.
        mpp: The level-0 scale written into the file (``PCAM_MPP / upscale`` is the truth);
            None writes none.
        seed: Which patches and textures.
        compression: The TIFF tiles' compression (see :func:`write_slide`; ``jpeg``, as
            scanners write, needs imagecodecs).

    Returns:
        One row per cell: ``row``, ``col``, ``x``, ``y``, ``width``, ``height`` (level-0
        pixels) and ``label`` (-1 glass, 0 normal, 1 tumour).
    """
    rng = np.random.default_rng(seed)
    rows, cols = grid
    side = PCAM_SIZE
    rr, cc = np.mgrid[:rows, :cols]
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    ay, ax = max(rows / 2 - 1.5, 1), max(cols / 2 - 1.5, 1)
    ellipse = ((rr - cy) / ay) ** 2 + ((cc - cx) / ax) ** 2 <= 1
    disc = np.hypot(rr - cy, cc - cx) <= tumour_radius * min(ay, ax)
    labels = np.where(ellipse, np.where(disc & tumour, 1, 0), -1)

    pools = None
    if patches is not None:
        pools = {k: _patch_files(Path(patches), k) for k in (0, 1)}
    canvas = np.empty((rows * side, cols * side, 3), np.uint8)
    for r in range(rows):
        for c in range(cols):
            label = labels[r, c]
            if label < 0:
                cell = np.clip(rng.normal(243, 3, (side, side, 3)), 0, 255).astype(np.uint8)
            elif pools is not None:
                f = pools[label][rng.integers(len(pools[label]))]
                cell = np.asarray(Image.open(f).convert("RGB").resize((side, side)))
            else:
                cell = _synthetic_patch(rng, bool(label), side)
            canvas[r * side:(r + 1) * side, c * side:(c + 1) * side] = cell
    if upscale != 1:
        canvas = np.asarray(Image.fromarray(canvas).resize(
            (cols * side * upscale, rows * side * upscale), Image.Resampling.BICUBIC))
    write_slide(path, canvas, mpp=mpp, compression=compression)
    s = side * upscale
    return pd.DataFrame({"row": rr.ravel(), "col": cc.ravel(), "x": cc.ravel() * s,
                         "y": rr.ravel() * s, "width": s, "height": s,
                         "label": labels.ravel()})

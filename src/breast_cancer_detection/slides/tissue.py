"""Where the tissue is (a mask on the thumbnail), and the grid of model-sized tiles over it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

# Otsu's threshold on saturation (0-1) is kept within these bounds. Glass, white background
# and grey dust sit under the lower one. Pale, eosin-stained tissue (stroma, fat seams) sits
# above the upper one; without it, a slide mostly covered by tissue has its saturation split
# between pale and dense tissue rather than between glass and tissue.
MIN_SATURATION = 0.07
MAX_SATURATION = 0.15


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values: the cut that maximises the between-class variance."""
    hist = np.bincount(np.asarray(values, np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mean_all = m0[-1] / total
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    return float(np.argmax(between))


def tissue_mask(rgb: np.ndarray, *, threshold: float | None = None,
                min_area: int = 0) -> tuple[np.ndarray, float]:
    """Tissue pixels of an RGB thumbnail.

    Saturation (HSV), smoothed by a 3x3 median, above Otsu's threshold (kept within
    :data:`MIN_SATURATION` and :data:`MAX_SATURATION`) or above ``threshold``; then specks
    smaller than ``min_area`` pixels are removed and holes smaller than it filled.

    Args:
        rgb: ``(H, W, 3)`` uint8.
        threshold: Saturation in 0-1 (``--tissue-threshold``); None: Otsu's.
        min_area: Specks and holes below this many pixels.

    Returns:
        The boolean mask and the saturation threshold used (0-1).
    """
    sat = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).convert("HSV"))[..., 1]
    sat = ndimage.median_filter(sat, size=3)
    if threshold is None:
        cut = min(max(otsu_threshold(sat) / 255.0, MIN_SATURATION), MAX_SATURATION)
    else:
        if not 0 <= threshold < 1:
            raise ValueError(f"tissue threshold {threshold}: a saturation in [0, 1)")
        cut = float(threshold)
    mask = sat > cut * 255
    if min_area > 1:
        mask = _drop_small(mask, min_area)
        mask = ~_drop_small(~mask, min_area, keep_border=True)
    return mask, cut


def _drop_small(mask: np.ndarray, min_area: int, keep_border: bool = False) -> np.ndarray:
    """``mask`` without its connected parts smaller than ``min_area`` (with ``keep_border``,
    parts touching the image edge stay: background around the tissue is no hole)."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_area
    keep[0] = False
    if keep_border:
        edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        keep[edge[edge > 0]] = True
    return keep[labels]


def whole_number(value: float) -> int | None:
    """``value`` as an int when it is a whole number (a pyramid level's downsample of
    exactly 2, 4...), else None."""
    return round(value) if abs(value - round(value)) < 1e-9 else None


@dataclass(frozen=True)
class TileGrid:
    """Non-overlapping tiles covering level 0, each the model's field of view.

    Attributes:
        tile0: Tile side in level-0 pixels (model input side x model mpp / slide mpp; on a
            level whose downsample is a whole number, rounded to whole pixels of that level,
            which the tile is read as anyway).
        level: The pyramid level tiles are read from: the coarsest whose pixels are no larger
            than the model's, so nothing is read from level 0 when a lower level serves.
        level_downsample: That level's downsample from level 0.
        read_size: Tile side in that level's pixels (resized to ``size`` when they differ).
        size: The model's input side.
        cols, rows: Tiles across and down (the last partial column and row are dropped).
    """

    tile0: float
    level: int
    level_downsample: float
    read_size: int
    size: int
    cols: int
    rows: int

    @classmethod
    def for_slide(cls, slide, *, size: int, slide_mpp: float, model_mpp: float) -> TileGrid:
        downsample = model_mpp / slide_mpp
        if downsample < 0.8:
            raise ValueError(
                f"the slide's pixels ({slide_mpp:g} um) are coarser than the model's "
                f"({model_mpp:g} um): its tiles would be enlarged {1 / downsample:.1f}x, "
                "detail the model was trained on that the scan does not have. Scan at a higher "
                "magnification, or use a model trained at this scale; if the slide's scale is "
                "wrong, give the right one with --mpp")
        tile0 = size * downsample
        w0, h0 = slide.dimensions
        if tile0 > min(w0, h0):
            raise ValueError(f"the slide ({w0}x{h0} px at {slide_mpp:g} um/px) is smaller than "
                             f"one tile of the model ({size} px at {model_mpp:g} um/px)")
        level = slide.get_best_level_for_downsample(downsample * 1.001)
        lds = float(slide.level_downsamples[level])
        read_size = max(1, round(tile0 / lds))
        if (step := whole_number(lds)) is not None:
            # A whole-number downsample: step by whole pixels of the level read (the tile
            # read is read_size level pixels whatever the step), so that tiles neither
            # overlap nor leave gaps and every tile starts on a level pixel, where the
            # slide's own tiles can be decoded directly (TiffLevel).
            tile0 = float(read_size * step)
        return cls(tile0=tile0, level=level, level_downsample=lds,
                   read_size=read_size, size=size,
                   cols=int(w0 // tile0), rows=int(h0 // tile0))

    def origins(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``(N, 2)`` level-0 top-left corners (x, y) of tiles at ``rows``, ``cols``."""
        return np.stack([np.round(cols * self.tile0), np.round(rows * self.tile0)],
                        1).astype(np.int64)

    def tissue_fraction(self, mask: np.ndarray, mask_downsample: float) -> np.ndarray:
        """``(rows, cols)``: the share of each tile's footprint that ``mask`` calls tissue
        (a summed-area table, so any mask size costs the same)."""
        h, w = mask.shape
        sat = np.zeros((h + 1, w + 1), np.int32)  # counts up to 2**31: masks to 46k px square
        sat[1:, 1:] = np.cumsum(np.cumsum(mask, 0, dtype=np.int32), 1, dtype=np.int32)

        def bounds(n: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
            lo = np.floor(np.arange(n) * self.tile0 / mask_downsample).astype(int)
            hi = np.ceil((np.arange(n) + 1) * self.tile0 / mask_downsample).astype(int)
            lo = np.clip(lo, 0, limit - 1)
            return lo, np.clip(np.maximum(hi, lo + 1), 1, limit)

        y0, y1 = bounds(self.rows, h)
        x0, x1 = bounds(self.cols, w)
        total = (sat[np.ix_(y1, x1)] - sat[np.ix_(y0, x1)] - sat[np.ix_(y1, x0)]
                 + sat[np.ix_(y0, x0)])
        area = np.outer(y1 - y0, x1 - x0)
        return total / area

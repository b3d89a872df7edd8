"""Images made ready for the model: the tiling rule and what an image costs
(:func:`image_cost`, :func:`tile_starts`), :class:`Preparer` (reads one input, refuses it or
transforms it, whole or as tiles), :class:`Prepared` (its outcome), and the inputs of a
prediction one by one (:func:`input_items`, :func:`item_batches`)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.datasets import ImageError, open_rgb
from ..data.transforms import MAX_ASPECT, Preprocessing
from ..errors import UserError
from .results import collect_images

PATCH_MODEL = "pcam-patch-cnn"
"""The registry name of the bundled 96 px patch model, which messages point to."""

DEFAULT_TILE_FACTOR = 2.0
"""Images whose short side exceeds this many tile sides are tiled instead of shrunk."""


# ----------------------------------------------------------------------------- tiling rule


def tile_starts(length: int, tile: int) -> list[int]:
    """Offsets of tiles of side ``tile`` with half-tile overlap; the last one ends flush."""
    stride = max(1, tile // 2)
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def _tile_side(pre: Preprocessing, tile_size: int | None) -> int:
    """The side of a tile in image pixels: ``tile_size``, else the training scale."""
    return int(tile_size or pre.resize or pre.size)


def _tiled(width: int, height: int, tile: int, tile_factor: float | None) -> bool:
    """The tiling rule: an image is cut into tiles when its short side is over
    ``tile_factor`` tile sides (never when ``tile_factor`` is None)."""
    return tile_factor is not None and min(width, height) > tile_factor * tile


def image_cost(pre: Preprocessing, width: int, height: int,
               tile_factor: float | None = DEFAULT_TILE_FACTOR, *,
               tile_size: int | None = None) -> tuple[int, int]:
    """Pixels held and model passes needed for one image of ``width`` x ``height`` pixels, as
    :meth:`Predictor.predict` and :func:`bcd.explain.explain` treat it, judged from its size
    alone (a header).

    Args:
        pre: The model's preprocessing.
        width, height: The image's size in pixels.
        tile_factor: As for :meth:`Predictor.predict`: the image is tiled when its short side
            is over this many tile sides; None never tiles.
        tile_size: Tile side in image pixels; None uses the training scale.

    Returns:
        ``(pixels, tiles)``: the decoded image plus its whole view resized for the model
        (short side to ``pre.resize``, the long side in proportion, as torchvision does; or
        ``pre.size`` squared without a resize), and the model inputs: 1 for an image
        predicted whole, else its tiles (overlapping by half, see :func:`tile_starts`).
    """
    short, long = max(1, min(width, height)), max(width, height)
    view = pre.resize * int(pre.resize * long / short) if pre.resize else pre.size ** 2
    tile = _tile_side(pre, tile_size)
    tiles = 1
    if _tiled(width, height, tile, tile_factor):
        tiles = len(tile_starts(height, tile)) * len(tile_starts(width, tile))
    return width * height + view, tiles


# ----------------------------------------------------------------------------- one input


@dataclass
class Prepared:
    """One input made ready for the model, or the reason it could not be."""

    index: int
    x: torch.Tensor | None = None          # (1, 3, size, size), an image predicted whole
    image: torch.Tensor | None = None      # (3, H, W) uint8, an image to be tiled
    boxes: list[tuple[int, int]] | None = None  # top-left corners of the tiles
    grid: tuple[int, int] | None = None
    error: str | None = None
    size: tuple[int, int] | None = None     # (width, height) of the image as read


class Preparer:
    """Reads one input and applies the evaluation transform, tiling large images.

    Inputs that would give no honest answer, or cost far more than their size suggests, are
    refused with a message: a short side under half the model's input (too little tissue at
    the training scale; upsampling it would invent the rest), and, for an image predicted
    whole, a long side over :data:`MAX_ASPECT` times the short one (the model would see only
    the centre, and the resize allocates in proportion to the ratio). Running out of memory
    on one input is that input's error too.

    A plain object rather than a method of Predictor, so that DataLoader workers can pickle
    it without the model.
    """

    def __init__(self, pre: Preprocessing, transform, *, max_pixels: int | None,
                 tile_factor: float | None, tile_size: int | None):
        self.pre = pre
        self.transform = transform
        self.max_pixels = max_pixels
        if tile_factor is not None and tile_factor < 1:
            raise UserError(f"tile_factor={tile_factor} must be at least 1 (an image is tiled "
                            "when its short side exceeds that many tiles), or None to never "
                            "tile.")
        if tile_size is not None and tile_size < 1:
            raise UserError(f"tile_size={tile_size} must be a positive number of pixels.")
        self.tile_factor = tile_factor
        self.tile = _tile_side(pre, tile_size)
        self.min_side = math.ceil(pre.size / 2)

    def tiled(self, width: int, height: int) -> bool:
        """Whether an image of this size is cut into tiles rather than predicted whole."""
        return _tiled(width, height, self.tile, self.tile_factor)

    def __call__(self, index: int, item) -> Prepared:
        # Files are named in the message (as open_rgb does); in-memory images by the caller.
        name = item if _is_path(item) else getattr(item, "name", None)
        prefix = f"{name}: " if name else ""
        size = "the image"
        full: list[tuple[int, int]] = []

        def reduced(w: int, h: int) -> int | None:
            # A JPEG predicted whole is resized down to the model's input: decoding it at a
            # reduced scale (never below that input) skips most of the work. Tiles are cut at
            # the image's own scale, so a tiled one is decoded whole.
            full.append((w, h))
            return None if self.tiled(w, h) else (self.pre.resize or self.pre.size)

        try:
            image = open_rgb(item, max_pixels=self.max_pixels, reduced=reduced)
            w, h = full[0] if full else image.size  # the checks below judge the file's size
            size = f"{w}x{h} pixels"
            refusal = self._refusal(w, h)
            if refusal is not None:
                return Prepared(index, error=prefix + refusal)
            if not self.tiled(w, h):
                return Prepared(index, x=self.transform(image).unsqueeze(0), size=(w, h))
            ys, xs = tile_starts(h, self.tile), tile_starts(w, self.tile)
            tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        except (ImageError, OSError) as e:
            return Prepared(index, error=str(e))
        except MemoryError:
            return Prepared(index, error=f"{prefix}ran out of memory preparing {size}; "
                             "lower --max-pixels (max_pixels) to refuse such images, or free "
                             "memory and run again.")
        return Prepared(index, image=tensor, boxes=[(y, x) for y in ys for x in xs],
                         grid=(len(ys), len(xs)), size=(w, h))

    def _refusal(self, w: int, h: int) -> str | None:
        """Why an image of this size gets no prediction, or None."""
        short, long = min(w, h), max(w, h)
        if short < self.min_side:
            return (f"{w}x{h} pixels is too small to hold tissue at the model's scale: the "
                    f"short side must be at least {self.min_side} px (half the model's input "
                    f"size of {self.pre.size} px). Use the original, full-size image; for "
                    f"96 px patches of lymph-node sections, such as PatchCamelyon's, use the "
                    f"patch model (--model {PATCH_MODEL}).")
        ratio = long / short
        if not self.tiled(w, h) and ratio > MAX_ASPECT:
            shown = f"{ratio:.2f}".rstrip("0").rstrip(".")
            return (f"{w}x{h} pixels has an aspect ratio of {shown}:1, over the limit of "
                    f"{MAX_ASPECT:g}:1 for an image predicted whole (the model would see only "
                    "its centre). Crop it into pieces closer to square (`bcd predict` can "
                    "also cut it into tiles: a --tile-size under half its short side, or "
                    "under its short side with --tile-factor 1).")
        return None

    def tiles(self, prepared: Prepared, chunk: int) -> Iterator[torch.Tensor]:
        """The model inputs of one prepared image, at most ``chunk`` at a time."""
        if prepared.x is not None:
            yield prepared.x
            return
        t = self.tile
        boxes = prepared.boxes or []
        for start in range(0, len(boxes), chunk):
            # Transformed lazily: a 10k x 10k image has thousands of tiles.
            yield torch.stack([self.transform(prepared.image[:, y:y + t, x:x + t])
                               for y, x in boxes[start:start + chunk]])


# ----------------------------------------------------------------------------- many inputs


def input_items(images) -> list:
    """The inputs of :meth:`Predictor.predict` one by one: a path or folder (alone or in a
    list) gives its image files (:func:`collect_images`), an image in memory is one item."""
    if isinstance(images, (list, tuple)):
        return [x for i in images for x in (collect_images([i]) if _is_path(i) else [i])]
    return collect_images([images]) if _is_path(images) else [images]


class ItemDataset(torch.utils.data.Dataset):
    """The inputs of one prediction as a dataset: item ``i`` is ``preparer(i, items[i])``."""

    def __init__(self, items: list, preparer: Preparer):
        self.items, self.preparer = items, preparer

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Prepared:
        return self.preparer(i, self.items[i])


def item_batches(items: list, preparer: Preparer, *, batch_size: int,
                 workers: int) -> torch.utils.data.DataLoader:
    """Batches of :class:`Prepared` inputs, lists of ``batch_size``, read by ``workers``
    DataLoader processes (0 reads in this process)."""
    return torch.utils.data.DataLoader(ItemDataset(items, preparer), batch_size=batch_size,
                                       num_workers=workers, collate_fn=_as_list)


def _as_list(batch: list) -> list:
    return batch


def _is_path(x) -> bool:
    return isinstance(x, (str, Path))

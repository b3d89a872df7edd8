"""The training and evaluation preprocessing on whole batches already on a device.

The batched counterparts of :func:`~.transforms.build_train_transform` and
:func:`~.transforms.build_eval_transform`, for images decoded ahead of time (the prepared cache):
one call augments a whole batch on the GPU, or on the CPU a few images at a time.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import get_worker_info

from .stain import EPS, hed_jitter_maps, uniform
from .transforms import (
    Augmentation,
    Preprocessing,
    TransformConfigError,
    contrast_saturation_,
    hue_matrices,
)


def _batch_to_float(x: Tensor) -> Tensor:
    _check_batch(x)
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32)


def _normalize(x: Tensor, pre: Preprocessing) -> Tensor:
    mean = torch.tensor(pre.mean, device=x.device, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(pre.std, device=x.device, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std


def normalize_batch(x: Tensor, pre: Preprocessing) -> Tensor:
    """A uint8 ``(N, 3, H, W)`` batch (or float in [0, 1]) as the model's normalised float32
    input, in one vectorised step: what the evaluation transform's last steps do per image.

    A uint8 batch, in whatever memory layout (``bcd slide`` hands over channels-last views),
    is converted into one new contiguous float32 tensor and scaled in place: three passes
    over the batch instead of the five of convert, divide, subtract, divide and make
    contiguous (under half the time for 64 tiles of 96 px), equal within float rounding.
    """
    if x.dtype != torch.uint8:
        return _normalize(_batch_to_float(x), pre)
    _check_batch(x)
    mean = torch.tensor(pre.mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float64).view(3, 1, 1)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    out.copy_(x)
    scale = (1 / (255 * std)).to(out)
    return out.mul_(scale).sub_((mean / std).to(out))


def _crop_boxes(n: int, height: int, width: int, scale: tuple[float, float],
                ratio: tuple[float, float], x: Tensor, generator: torch.Generator | None,
                tries: int = 10) -> Tensor:
    """RandomResizedCrop's boxes for ``n`` images, as ``(n, 4)`` float ``x1, y1, x2, y2``.

    Same distribution as torchvision's sampler without rounding to whole pixels: up to
    ``tries`` candidates each, the first that fits wins, else a centre crop at the nearest
    allowed aspect ratio.
    """
    draw = functools.partial(uniform, (n, tries), device=x.device, dtype=torch.float32,
                             generator=generator)
    area = height * width * draw(scale[0], scale[1])
    aspect = torch.exp(draw(math.log(ratio[0]), math.log(ratio[1])))
    w = torch.sqrt(area * aspect)
    h = torch.sqrt(area / aspect)
    fits = (w <= width) & (h <= height)
    # Index of the first candidate that fits (argmax returns the first maximum).
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    any_fit = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = float(width), width / ratio[0]
    elif in_ratio > ratio[1]:
        fw, fh = height * ratio[1], float(height)
    else:
        fw, fh = float(width), float(height)
    w = torch.where(any_fit, w, torch.full_like(w, fw))
    h = torch.where(any_fit, h, torch.full_like(h, fh))
    u = torch.rand((n, 2), generator=generator, device=x.device)
    x1 = torch.where(any_fit, u[:, 0] * (width - w), (width - w) / 2)
    y1 = torch.where(any_fit, u[:, 1] * (height - h), (height - h) / 2)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


# The batched augmentation works in one resampling pass: crop, flips and quarter turns are all
# affine maps of the image plane, so each image's three compose into one 2x3 matrix and the
# whole batch is sampled once with grid_sample, instead of resizing and then selecting among
# every flipped and turned alternative. Colour steps then run in place on the small output.

# A quarter turn as a map from output to source coordinates (x right, y down, both in [-1, 1]):
# torch.rot90(img, k) shows at (x, y) what img has at _TURNS[k] @ (x, y).
_TURNS = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],
                       [[0.0, -1.0], [1.0, 0.0]],
                       [[-1.0, 0.0], [0.0, -1.0]],
                       [[0.0, 1.0], [-1.0, 0.0]]])

# ITU-R 601 luma, the weights torchvision's rgb_to_grayscale uses.

# On the CPU a batch goes through a few images at a time. A whole batch of 256 x 389 images as
# float32 is over glibc's 32 MiB mmap threshold, so every call would get fresh pages from the
# kernel and fault them in, which costs more than the conversion that fills them; chunks stay
# in memory the allocator reuses (and closer to the caches). GPUs take the batch whole.
_CPU_CHUNK_ELEMENTS = 1 << 21


class _Draws(NamedTuple):
    """One batch's random parameters, all drawn before any work so chunking cannot change them.

    Colour entries are None when that augmentation is off.
    """

    theta: Tensor
    """(N, 2, 3): output to source sampling coordinates, as :func:`F.affine_grid` takes."""
    gain: Tensor
    """(N,): brightness factor, times 1/255 for uint8 input."""
    contrast: Tensor | None
    """(N,)"""
    saturation: Tensor | None
    """(N,)"""
    hue: Tensor | None
    """(N, 3, 3): RGB to RGB hue rotation."""
    hed: Tensor | None
    """(N, 3, 3): log RGB to log RGB, the HED jitter (see :func:`_hed_maps`)."""
    hed_bias: Tensor | None
    """(N, 3, 1): its stain offset in log2 RGB."""
    boxes: Tensor
    """(N, 4): crop boxes ``x1, y1, x2, y2`` in source pixels (what ``theta`` was built from)."""
    flip_x: Tensor | None
    """(N,) bool: mirror left-right after the crop; None for never."""
    flip_y: Tensor | None
    """(N,) bool: then mirror up-down; None for never."""
    turns: Tensor | None
    """(N,) int: then this many quarter turns counter-clockwise; None for none."""

    def rows(self, part: slice) -> _Draws:
        """The draws of the images in ``part``."""
        return _Draws(*(None if t is None else t[part] for t in self))


def _check_batch(x: Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"Expected a batch of shape (N, 3, H, W), got {tuple(x.shape)}.")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise TypeError(f"Expected uint8 or float in [0, 1], got {x.dtype}.")


def _sampling_matrices(boxes: Tensor, height: int, width: int, flip_x: Tensor | None,
                       flip_y: Tensor | None, turns: Tensor | None) -> Tensor:
    """Affine maps from output to source coordinates for crop, then flips, then quarter turns.

    Args:
        boxes: ``(N, 4)`` crop boxes ``x1, y1, x2, y2`` in pixels (``0..width``, ``0..height``).
        height: Source height in pixels.
        width: Source width in pixels.
        flip_x: ``(N,)`` bool, mirror left-right after the crop; None for never.
        flip_y: ``(N,)`` bool, mirror up-down after that; None for never.
        turns: ``(N,)`` quarter turns counter-clockwise after the flips; None for none.

    Returns:
        ``(N, 2, 3)`` matrices for :func:`F.affine_grid` (``align_corners=False``).
    """
    n = boxes.shape[0]
    # Output point p shows the cropped image at flips(turn(p)): the last step applied to the
    # image is the first applied to the coordinates.
    lin = torch.eye(2, device=boxes.device).expand(n, 2, 2)
    if turns is not None:
        lin = _TURNS.to(boxes.device)[turns]
    signs = torch.ones(n, 2, device=boxes.device)
    if flip_x is not None:
        signs[:, 0] = torch.where(flip_x, -1.0, 1.0)
    if flip_y is not None:
        signs[:, 1] = torch.where(flip_y, -1.0, 1.0)
    lin = signs[:, :, None] * lin
    # The crop box in normalised coordinates: half-extent scales, centre translates.
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    half = torch.stack([(x2 - x1) / width, (y2 - y1) / height], dim=1)
    centre = torch.stack([(x1 + x2) / width - 1, (y1 + y2) / height - 1], dim=1)
    return torch.cat([half[:, :, None] * lin, centre[:, :, None]], dim=2)


def _affine_grid(theta: Tensor, size: int) -> Tensor:
    """``F.affine_grid(theta, (N, C, size, size), align_corners=False)``, built faster.

    Row i of an image's grid is ``(y_i, 1)`` times a ``(2, 2 * size)`` matrix; affine_grid's
    CPU path multiplies a ``(size * size, 3)`` base grid instead, which takes as long as the
    sampling itself.
    """
    n = theta.shape[0]
    lin = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1
    rows = torch.stack([lin, torch.ones_like(lin)], dim=1)  # (size, 2): y_i, 1
    down = theta[:, None, :, 1].expand(n, size, 2)  # y's coefficient, the same in every column
    across = lin[None, :, None] * theta[:, None, :, 0] + theta[:, None, :, 2]  # (n, size, 2)
    right = torch.stack([down, across], dim=1).reshape(n, 2, 2 * size)
    return torch.matmul(rows, right).view(n, size, size, 2)


_RESAMPLERS = ("auto", "grid", "crop")


def _crop_resample(x: Tensor, d: _Draws, size: int) -> Tensor:
    """Crop, resize, flip and turn each image on its own: ``BatchAugment``'s CPU resampler.

    Args:
        x: ``(N, 3, H, W)`` uint8 (fastest in channels-last layout, as the cache's collate
            makes it) or float.
        d: The draws; uses ``boxes``, ``flip_x``, ``flip_y`` and ``turns``.
        size: Output side in pixels.

    Returns:
        ``(N, 3, size, size)`` contiguous float32, in ``x``'s value range (0..255 for uint8).
    """
    n, _, height, width = x.shape
    resized = torch.empty((n, 3, size, size), dtype=x.dtype, device=x.device)
    boxes = d.boxes.round().to(torch.int64).tolist()
    flip_x = d.flip_x.tolist() if d.flip_x is not None else [False] * n
    flip_y = d.flip_y.tolist() if d.flip_y is not None else [False] * n
    turns = d.turns.tolist() if d.turns is not None else [0] * n
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        x1, y1 = min(max(x1, 0), width - 1), min(max(y1, 0), height - 1)
        x2, y2 = min(max(x2, x1 + 1), width), min(max(y2, y1 + 1), height)
        img = x[i:i + 1, :, y1:y2, x1:x2]
        if (y2 - y1, x2 - x1) != (size, size):  # a box of the output's size is copied as it is
            img = F.interpolate(img.contiguous(memory_format=torch.channels_last),
                                size=(size, size), mode="bilinear", antialias=True,
                                align_corners=False)
        dims = [d for d, flip in ((3, flip_x[i]), (2, flip_y[i])) if flip]
        if dims:
            img = img.flip(dims)
        if turns[i]:
            img = img.rot90(turns[i], dims=(2, 3))
        resized[i] = img[0]
    return resized.to(torch.float32)


def random_windows(x: Tensor, side: int, generator: torch.Generator | None = None) -> Tensor:
    """A random ``side`` x ``side`` window of each image, at the image's own scale.

    Args:
        x: ``(N, C, H, W)`` batch of any dtype, with ``H, W >= side``.
        generator: Source of the window positions, on ``x.device``; None uses the global one.

    Returns:
        ``(N, C, side, side)``, ``x``'s dtype and memory format; ``x`` itself when it is no
        larger than ``side``.
    """
    n, _, height, width = x.shape
    if side >= height and side >= width:
        return x
    if side > height or side > width:
        raise TransformConfigError(f"a {side} px window does not fit {height}x{width} images.")
    tops = torch.randint(height - side + 1, (n,), generator=generator, device=x.device)
    lefts = torch.randint(width - side + 1, (n,), generator=generator, device=x.device)
    out = torch.empty_like(x[:, :, :side, :side])  # x's layout (channels-last stays so)
    for i, (top, left) in enumerate(zip(tops.tolist(), lefts.tolist())):
        out[i] = x[i, :, top:top + side, left:left + side]
    return out


def new_batch_tensor(shape: tuple[int, ...], device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """An uninitialised tensor for a batch that a DataLoader worker may be building.

    In a DataLoader worker the batch travels to the main process through shared memory:
    allocated there to begin with, as default_collate allocates its batches, it is not copied
    over on the way out (a 19 MB copy per float32 batch of 32 at 224 px).
    """
    device = torch.device(device)
    if device.type == "cpu" and get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    return torch.empty(shape, device=device, dtype=dtype)


class BatchAugment(torch.nn.Module):
    """The training augmentation on a whole batch on its device, each image drawn independently.

    The batched counterpart of :func:`build_train_transform` for images decoded ahead of time:
    random resized crop, flips, quarter turns, brightness/contrast/saturation/hue jitter, HED
    jitter and normalisation. Hue uses a YIQ rotation rather than HSV, and colour jitter applies
    in a fixed order; the distributions otherwise match the per-image pipeline.

    Crop, flips and turns are resampled one of two ways (``resample``):

    - ``grid``, the default on GPUs: one bilinear ``grid_sample`` per batch through each
      image's composed affine map, at sub-pixel crop boxes, without the antialiasing filter of
      the per-image ``RandomResizedCrop``: from the prepared cache (short side 256) to 224 px a
      crop shrinks by less than 2x (at most 1.52x, a full-height 4:3 crop), where bilinear
      taps, two source pixels wide, still touch every source pixel. Much larger images, or a
      much smaller ``size``, would alias; resize them first (``bcd prepare``).
    - ``crop``, the default on the CPU: each image's box rounded to whole pixels (as
      ``RandomResizedCrop`` does), resized with antialiasing straight from uint8, then flipped
      and turned. It never converts whole source images to float, and uses torch's vectorised
      uint8 resize: the resampling takes about half the CPU time of ``grid`` at 256 -> 224 px
      (0.4 against 1.0 ms per image on one core here).

    Both draw the same boxes, flips and turns from the same generator; they differ by the
    rounding of the box and by the interpolation filter.
    """

    def __init__(self, *, pre: Preprocessing, aug: Augmentation,
                 resample: str = "auto") -> None:
        super().__init__()
        if resample not in _RESAMPLERS:
            raise TransformConfigError(
                f"resample={resample!r}: use one of {', '.join(_RESAMPLERS)}.")
        self.pre = pre
        self.aug = aug
        self.resample = resample

    def _resampler(self, x: Tensor) -> str:
        if self.resample != "auto":
            return self.resample
        return "crop" if x.device.type == "cpu" else "grid"

    @torch.no_grad()
    def forward(self, x: Tensor, generator: torch.Generator | None = None,
                window: int | None = None) -> Tensor:
        """Augment and normalise a batch.

        Args:
            x: ``(N, 3, H, W)`` uint8, or float in [0, 1], on any device.
            generator: Source of the random draws, on ``x.device``; None uses the global one.
            window: Cut a random ``window`` x ``window`` part of each image first, at its own
                scale, and augment that into a ``window``-px output (cheaper training steps;
                see ``TrainConfig.early_crop``); None augments whole images to ``size``.

        Returns:
            Normalised float32 ``(N, 3, size, size)`` (``window`` when given) on ``x.device``.
        """
        _check_batch(x)
        size = self.pre.size
        if window is not None:
            x, size = random_windows(x, window, generator), window
        n, _, height, width = x.shape
        draws = self._draw(x, generator)
        out = new_batch_tensor((n, 3, size, size), x.device)
        step = max(1, n)
        if x.device.type == "cpu":
            step = max(1, _CPU_CHUNK_ELEMENTS // (3 * height * width))
        for start in range(0, n, step):
            part = slice(start, start + step)
            self._augment(x[part], draws.rows(part), out[part], size)
        return out

    def _draw(self, x: Tensor, generator: torch.Generator | None) -> _Draws:
        aug = self.aug
        n, _, height, width = x.shape
        if aug.crop:
            boxes = _crop_boxes(n, height, width, aug.scale, aug.ratio, x, generator)
        else:
            boxes = torch.tensor([[0.0, 0.0, width, height]], device=x.device).expand(n, 4)
        # float32 draws whatever x's dtype, so one seed augments a uint8 batch and its float
        # copy alike.
        draw = functools.partial(uniform, device=x.device, dtype=torch.float32,
                                 generator=generator)
        flip_x = flip_y = turns = None
        if aug.flips:
            flip_x = draw(n, 0.0, 1.0) < 0.5
            flip_y = draw(n, 0.0, 1.0) < 0.5
        if aug.rot90:
            turns = torch.randint(4, (n,), generator=generator, device=x.device)
        theta = _sampling_matrices(boxes, height, width, flip_x, flip_y, turns)

        gain = torch.full((n,), 1 / 255 if x.dtype == torch.uint8 else 1.0, device=x.device)
        contrast = saturation = hue = hed = hed_bias = None
        if aug.color_jitter > 0:
            s = aug.color_jitter
            lo = max(0.0, 1.0 - s)
            gain = gain * draw(n, lo, 1.0 + s)
            contrast = draw(n, lo, 1.0 + s)
            saturation = draw(n, lo, 1.0 + s)
        if aug.hue > 0:
            hue = hue_matrices(draw(n, -aug.hue, aug.hue))
        if aug.hed > 0:
            # Drawn as stain.hed_jitter draws them: alpha, then beta, (N, 3) each.
            alpha = draw((n, 3), 1.0 - aug.hed, 1.0 + aug.hed)
            beta = draw((n, 3), -aug.hed, aug.hed)
            hed, hed_bias = hed_jitter_maps(alpha, beta)
        return _Draws(theta, gain, contrast, saturation, hue, hed, hed_bias, boxes, flip_x, flip_y,
                      turns)

    def _augment(self, x: Tensor, d: _Draws, out: Tensor, size: int) -> None:
        """Augment ``x`` with the draws ``d`` and write the normalised ``size``-px result into
        ``out``."""
        n = x.shape[0]
        view = (n, 1, 1, 1)
        # uint8 values are kept 0..255 through the sampling; d.gain folds in the 1/255.
        if self._resampler(x) == "grid":
            # float32 on every device: the grid takes the input's dtype, and half-precision
            # coordinates would place samples up to a tenth of a pixel off.
            y = F.grid_sample(x.to(torch.float32), _affine_grid(d.theta, size), mode="bilinear",
                              padding_mode="border", align_corners=False)
        else:
            y = _crop_resample(x, d, size)
        # Everything below works in place on y, which this call owns. Each step clamps to
        # [0, 1], as torchvision's colour functions do.
        y.mul_(d.gain.view(view))
        if d.contrast is not None:
            y.clamp_(0.0, 1.0)  # the brightness step's clamp
            contrast_saturation_(y, d.contrast, d.saturation)
        if d.hue is not None:
            y = torch.bmm(d.hue, y.view(n, 3, -1)).view(n, 3, size, size)
            if d.hed is None:
                y.clamp_(0.0, 1.0)  # else the HED step's clamp to [EPS, 1] covers it
        if d.hed is not None:
            # Base-2 logs: exp2 is a third of exp's cost, and _hed_maps' map works in any base.
            y.clamp_(EPS, 1.0).log2_()  # the epsilon floor of stain.rgb_to_hed
            y = torch.baddbmm(d.hed_bias, d.hed, y.view(n, 3, -1)).view(n, 3, size, size)
            y.exp2_().clamp_(0.0, 1.0)
        mean = torch.tensor(self.pre.mean, device=y.device).view(1, 3, 1, 1)
        std = torch.tensor(self.pre.std, device=y.device).view(1, 3, 1, 1)
        # mul then add_: one addcmul with three broadcast operands runs unvectorised, 3x slower.
        torch.mul(y, 1 / std, out=out).add_(-mean / std)

    def extra_repr(self) -> str:
        return f"pre={self.pre}, aug={self.aug}"


class BatchEval(torch.nn.Module):
    """The evaluation preprocessing on a whole batch on its device.

    Matches :func:`build_eval_transform`: short side resized to ``pre.resize`` (antialiased
    bilinear), centre crop to ``pre.size``, normalise; or a straight resize to ``size`` x
    ``size`` when ``pre.resize`` is None.
    """

    def __init__(self, *, pre: Preprocessing) -> None:
        super().__init__()
        self.pre = pre

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Resize, crop and normalise a batch.

        Args:
            x: ``(N, 3, H, W)`` uint8, or float in [0, 1], on any device.

        Returns:
            Normalised float32 ``(N, 3, size, size)`` on ``x.device``.
        """
        pre = self.pre
        x = _batch_to_float(x)
        height, width = x.shape[-2:]
        if pre.resize:
            # torchvision's rule: the short side becomes `resize`, the long side is truncated.
            short, long = sorted((height, width))
            new_long = int(pre.resize * long / short)
            new_h, new_w = (pre.resize, new_long) if height <= width else (new_long, pre.resize)
        else:
            new_h = new_w = pre.size
        if (new_h, new_w) != (height, width):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False,
                              antialias=True).clamp_(0.0, 1.0)
        if pre.resize:
            top = int(round((new_h - pre.size) / 2.0))
            left = int(round((new_w - pre.size) / 2.0))
            x = x[..., top:top + pre.size, left:left + pre.size]
        return _normalize(x, pre)

    def extra_repr(self) -> str:
        return f"pre={self.pre}"

"""Training and evaluation preprocessing, defined once for PIL images and for GPU batches."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import roi_align

from ..errors import UserError
from .stain import HEDJitter, hed_jitter

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TransformConfigError(UserError, ValueError):
    """Preprocessing or augmentation settings that cannot work; the message says which."""


def _float_tuple(value: Any, n: int, name: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except TypeError:
        raise TransformConfigError(f"{name}={value!r}: expected {n} numbers.") from None
    if len(out) != n:
        raise TransformConfigError(f"{name}={value!r}: expected {n} numbers, got {len(out)}.")
    return out


def _plain(value: Any) -> Any:
    # Tuples become lists so the dict loads with torch.load(weights_only=True) and dumps to
    # YAML without python/tuple tags.
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise TransformConfigError(f"Unknown {cls.__name__} settings: {', '.join(unknown)}; "
                                   f"known ones are {', '.join(sorted(names))}.")
    # Missing keys take the defaults, so dicts saved before a field existed still load.
    return cls(**d)


@dataclass(frozen=True)
class Preprocessing:
    """What travels with a model and its checkpoint so inference prepares images as training did."""

    size: int = 224
    """Side of the square crop fed to the model."""
    resize: int | None = 256
    """Evaluation: short side resized to this before the centre crop; None resizes straight to
    ``size`` x ``size``."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        # Frozen: normalise the types through object.__setattr__ so YAML lists and ints work.
        object.__setattr__(self, "size", int(self.size))
        if self.resize is not None:
            object.__setattr__(self, "resize", int(self.resize))
        object.__setattr__(self, "mean", _float_tuple(self.mean, 3, "mean"))
        object.__setattr__(self, "std", _float_tuple(self.std, 3, "std"))
        if self.size < 1:
            raise TransformConfigError(f"size={self.size} must be positive.")
        if self.resize is not None and self.resize < self.size:
            raise TransformConfigError(f"resize={self.resize} is smaller than size={self.size}; "
                                       "use resize >= size, or None to resize straight to size.")
        if any(s <= 0 for s in self.std):
            raise TransformConfigError(f"std={self.std} must be positive.")

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain lists, floats and ints."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Rebuild from :meth:`to_dict` output; missing keys take the defaults.

        Raises:
            TransformConfigError: A key is unknown or a value is invalid.
        """
        return _from_dict(cls, d)


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation settings."""

    scale: tuple[float, float] = (0.35, 1.0)
    """Range of the crop's share of the image area (RandomResizedCrop)."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Range of the crop's aspect ratio, width over height."""
    flips: bool = True
    """Random horizontal and vertical flips."""
    rot90: bool = True
    """Random 90-degree rotations; with flips, all 8 symmetries of the square."""
    color_jitter: float = 0.1
    """Brightness, contrast and saturation strength; 0 disables."""
    hue: float = 0.02
    """Hue shift strength (fraction of a full turn); 0 disables."""
    hed: float = 0.05
    """HED stain jitter sigma and bias; 0 disables."""
    crop: bool = True
    """False: no random crop, just resize to ``size`` (for small patches such as 96 px PCam)."""

    def __post_init__(self) -> None:
        scale = _float_tuple(self.scale, 2, "scale")
        ratio = _float_tuple(self.ratio, 2, "ratio")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)
        for name in ("color_jitter", "hue", "hed"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if not 0 < scale[0] <= scale[1] <= 1:
            raise TransformConfigError(f"scale={scale}: need 0 < low <= high <= 1.")
        if not 0 < ratio[0] <= ratio[1]:
            raise TransformConfigError(f"ratio={ratio}: need 0 < low <= high.")
        if self.color_jitter < 0 or self.hed < 0:
            raise TransformConfigError("color_jitter and hed must be non-negative.")
        if not 0 <= self.hue <= 0.5:
            raise TransformConfigError(f"hue={self.hue} must be in [0, 0.5].")

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain lists, floats and bools."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Augmentation:
        """Rebuild from :meth:`to_dict` output or YAML overrides; missing keys take the defaults.

        Raises:
            TransformConfigError: A key is unknown or a value is invalid.
        """
        return _from_dict(cls, d)


# ---------------------------------------------------------------------------------------------
# Per-image pipelines (DataLoader workers)
# ---------------------------------------------------------------------------------------------


class RandomRot90(torch.nn.Module):
    """Rotate an image by a random multiple of 90 degrees (tensor ``(..., H, W)`` or PIL)."""

    _PIL_OPS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                Image.Transpose.ROTATE_270)

    def forward(self, x: Any) -> Any:
        """Return ``x`` rotated counter-clockwise by k * 90 degrees, k uniform in 0..3."""
        k = int(torch.randint(4, ()).item())
        if isinstance(x, Image.Image):
            return x if k == 0 else x.transpose(self._PIL_OPS[k])
        out = torch.rot90(x, k, dims=(-2, -1))
        # torch ops drop the tv_tensors subclass; keep it so later v2 transforms see an image.
        return tv_tensors.wrap(out, like=x) if isinstance(x, tv_tensors.TVTensor) else out


def build_train_transform(*, pre: Preprocessing,
                          aug: Augmentation) -> Callable[[Image.Image], Tensor]:
    """The per-image training pipeline.

    Args:
        pre: Crop size and normalisation.
        aug: Which augmentations to apply and how strongly.

    Returns:
        A picklable callable taking an RGB PIL image (or uint8 tensor) and returning a
        normalised float32 tensor of shape ``(3, size, size)``.
    """
    size = pre.size
    steps: list[Any] = []
    if aug.crop:
        steps.append(T.RandomResizedCrop(size, scale=aug.scale, ratio=aug.ratio, antialias=True))
    else:
        steps.append(T.Resize((size, size), antialias=True))
    if aug.flips:
        steps += [T.RandomHorizontalFlip(), T.RandomVerticalFlip()]
    # Colour work on uint8 tensors rather than PIL: the same code path as everything after it.
    steps.append(T.ToImage())
    if aug.rot90:
        steps.append(RandomRot90())
    if aug.color_jitter > 0 or aug.hue > 0:
        cj = aug.color_jitter or None
        steps.append(T.ColorJitter(brightness=cj, contrast=cj, saturation=cj,
                                   hue=aug.hue or None))
    steps.append(T.ToDtype(torch.float32, scale=True))
    if aug.hed > 0:
        steps.append(HEDJitter(sigma=aug.hed, bias=aug.hed))
    # Plain tensors out, so collate and torch.save never see the tv_tensors subclass.
    steps += [T.Normalize(mean=list(pre.mean), std=list(pre.std)), T.ToPureTensor()]
    return T.Compose(steps)


def build_eval_transform(*, pre: Preprocessing) -> Callable[[Image.Image], Tensor]:
    """The deterministic per-image evaluation and inference pipeline.

    Args:
        pre: Resize, crop size and normalisation.

    Returns:
        A picklable callable taking an RGB PIL image (or uint8 tensor) and returning a
        normalised float32 tensor of shape ``(3, size, size)``.
    """
    if pre.resize:
        steps: list[Any] = [T.Resize(pre.resize, antialias=True), T.CenterCrop(pre.size)]
    else:
        steps = [T.Resize((pre.size, pre.size), antialias=True)]
    steps += [T.ToImage(), T.ToDtype(torch.float32, scale=True),
              T.Normalize(mean=list(pre.mean), std=list(pre.std)), T.ToPureTensor()]
    return T.Compose(steps)


# ---------------------------------------------------------------------------------------------
# Batched pipelines (whole batches already on a device)
# ---------------------------------------------------------------------------------------------


def _batch_to_float(x: Tensor) -> Tensor:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"Expected a batch of shape (N, 3, H, W), got {tuple(x.shape)}.")
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if not x.is_floating_point():
        raise TypeError(f"Expected uint8 or float in [0, 1], got {x.dtype}.")
    return x.to(torch.float32)


def _normalize(x: Tensor, pre: Preprocessing) -> Tensor:
    mean = torch.tensor(pre.mean, device=x.device, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(pre.std, device=x.device, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std


def denormalize(x: Tensor, pre: Preprocessing) -> Tensor:
    """Undo the normalisation, for plotting.

    Args:
        x: Normalised tensor of shape ``(3, H, W)`` or ``(N, 3, H, W)``.
        pre: The settings that normalised it.

    Returns:
        Float tensor in [0, 1] of the same shape.
    """
    mean = torch.tensor(pre.mean, device=x.device, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(pre.std, device=x.device, dtype=x.dtype).view(3, 1, 1)
    return (x * std + mean).clamp(0.0, 1.0)


def dihedral(x: Tensor, k: int) -> Tensor:
    """One of the 8 symmetries of the square, for test-time augmentation.

    Args:
        x: Tensor of shape ``(..., H, W)``.
        k: 0..7. ``k % 4`` quarter turns counter-clockwise; ``k >= 4`` mirrors left-right
            first.

    Returns:
        The transformed tensor; ``k = 0`` returns ``x`` itself.
    """
    if not 0 <= k <= 7:
        raise ValueError(f"k={k} must be in 0..7.")
    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x


def dihedral_inverse(k: int) -> int:
    """The ``j`` with ``dihedral(dihedral(x, k), j) == x``, e.g. to map TTA heat maps back."""
    if not 0 <= k <= 7:
        raise ValueError(f"k={k} must be in 0..7.")
    # Mirror-then-rotate is a reflection, which undoes itself; a pure rotation needs the
    # opposite turn.
    return k if k >= 4 else (4 - k) % 4


def _rand(n: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator, device=x.device, dtype=torch.float32)


def _uniform(n: int, low: float, high: float, x: Tensor,
             generator: torch.Generator | None) -> Tensor:
    return low + (high - low) * _rand(n, x, generator)


def _crop_boxes(n: int, height: int, width: int, scale: tuple[float, float],
                ratio: tuple[float, float], x: Tensor, generator: torch.Generator | None,
                tries: int = 10) -> Tensor:
    """RandomResizedCrop's boxes for ``n`` images, as ``(n, 4)`` float ``x1, y1, x2, y2``.

    Same distribution as torchvision's sampler without rounding to whole pixels: up to
    ``tries`` candidates each, the first that fits wins, else a centre crop at the nearest
    allowed aspect ratio.
    """
    shape = (n, tries)
    area = height * width * (scale[0] + (scale[1] - scale[0]) *
                             torch.rand(shape, generator=generator, device=x.device))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) *
                       torch.rand(shape, generator=generator, device=x.device))
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


def _crop_resize(x: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop each image to its box and resize to ``size`` x ``size``.

    roi_align with adaptive sampling averages about one sample per source pixel in each output
    bin, which acts as an area filter: downscaling does not alias the way grid_sample would.
    """
    index = torch.arange(x.shape[0], device=x.device, dtype=boxes.dtype)[:, None]
    return roi_align(x, torch.cat([index, boxes], dim=1), output_size=(size, size),
                     spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def _per_sample(mask: Tensor, then: Tensor, otherwise: Tensor) -> Tensor:
    return torch.where(mask[:, None, None, None], then, otherwise)


def _grey(x: Tensor) -> Tensor:
    # ITU-R 601 luma, the weights torchvision's rgb_to_grayscale uses.
    r, g, b = x.unbind(dim=1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


# RGB <-> YIQ: rotating the I/Q chroma plane shifts hue, a linear stand-in for the HSV hue
# shift of ColorJitter that vectorises over the batch.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114],
                            [0.595716, -0.274453, -0.321263],
                            [0.211456, -0.522591, 0.311135]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def _hue_shift(x: Tensor, turns: Tensor) -> Tensor:
    theta = 2 * math.pi * turns
    cos, sin = torch.cos(theta), torch.sin(theta)
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rot = torch.stack([torch.stack([one, zero, zero], -1),
                       torch.stack([zero, cos, -sin], -1),
                       torch.stack([zero, sin, cos], -1)], -2)  # (N, 3, 3)
    to_yiq = _RGB_TO_YIQ.to(x.device, x.dtype)
    to_rgb = _YIQ_TO_RGB.to(x.device, x.dtype)
    mats = to_rgb @ rot @ to_yiq
    return torch.einsum("nij,njhw->nihw", mats, x)


class BatchAugment(torch.nn.Module):
    """The training augmentation on a whole batch on its device, each image drawn independently.

    The batched counterpart of :func:`build_train_transform` for images decoded ahead of time:
    random resized crop, flips, quarter turns, brightness/contrast/saturation/hue jitter, HED
    jitter and normalisation. Hue uses a YIQ rotation rather than HSV, and colour jitter applies
    in a fixed order; the distributions otherwise match the per-image pipeline.
    """

    def __init__(self, *, pre: Preprocessing, aug: Augmentation) -> None:
        super().__init__()
        self.pre = pre
        self.aug = aug

    @torch.no_grad()
    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment and normalise a batch.

        Args:
            x: ``(N, 3, H, W)`` uint8, or float in [0, 1], on any device.
            generator: Source of the random draws, on ``x.device``; None uses the global one.

        Returns:
            Normalised float32 ``(N, 3, size, size)`` on ``x.device``.
        """
        pre, aug = self.pre, self.aug
        x = _batch_to_float(x)
        n, _, height, width = x.shape
        if aug.crop:
            boxes = _crop_boxes(n, height, width, aug.scale, aug.ratio, x, generator)
        else:
            boxes = torch.tensor([[0.0, 0.0, width, height]], device=x.device).expand(n, 4)
        x = _crop_resize(x, boxes, pre.size)

        # Geometry after the crop: the images are now small and square.
        if aug.flips:
            x = _per_sample(_rand(n, x, generator) < 0.5, x.flip(-1), x)
            x = _per_sample(_rand(n, x, generator) < 0.5, x.flip(-2), x)
        if aug.rot90:
            turns = torch.randint(4, (n,), generator=generator, device=x.device)
            out = x
            for k in (1, 2, 3):
                out = _per_sample(turns == k, torch.rot90(x, k, dims=(-2, -1)), out)
            x = out

        if aug.color_jitter > 0:
            s = aug.color_jitter
            lo = max(0.0, 1.0 - s)
            view = (n, 1, 1, 1)
            bright = _uniform(n, lo, 1.0 + s, x, generator).view(view)
            x = (x * bright).clamp_(0.0, 1.0)
            contrast = _uniform(n, lo, 1.0 + s, x, generator).view(view)
            mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
            x = (contrast * x + (1 - contrast) * mean).clamp_(0.0, 1.0)
            sat = _uniform(n, lo, 1.0 + s, x, generator).view(view)
            x = (sat * x + (1 - sat) * _grey(x)).clamp_(0.0, 1.0)
        if aug.hue > 0:
            shift = _uniform(n, -aug.hue, aug.hue, x, generator)
            x = _hue_shift(x, shift).clamp_(0.0, 1.0)
        if aug.hed > 0:
            x = hed_jitter(x, sigma=aug.hed, bias=aug.hed, generator=generator)
        return _normalize(x, pre)

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

"""Training and evaluation preprocessing of single images, and the dihedral symmetries for TTA.

The batched versions, for whole batches on a device, are in :mod:`.batch_augment`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ..errors import UserError
from ..files import plain
from .stain import HEDJitter

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


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    from ..config import dataclass_from_dict

    return dataclass_from_dict(cls, d, TransformConfigError)


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
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

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
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

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


LUMA = torch.tensor([0.299, 0.587, 0.114])
"""RGB weights of grey (ITU-R 601), as torchvision's colour functions use them."""


# RGB <-> YIQ: rotating the I/Q chroma plane shifts hue, a linear stand-in for the HSV hue
# shift of ColorJitter that vectorises over a batch.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114],
                            [0.595716, -0.274453, -0.321263],
                            [0.211456, -0.522591, 0.311135]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)

def hue_matrices(turns: Tensor) -> Tensor:
    """``(N, 3, 3)`` RGB to RGB maps rotating each image's chroma by ``turns`` of a circle."""
    theta = 2 * math.pi * turns
    cos, sin = torch.cos(theta), torch.sin(theta)
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rot = torch.stack([torch.stack([one, zero, zero], -1),
                       torch.stack([zero, cos, -sin], -1),
                       torch.stack([zero, sin, cos], -1)], -2)
    return _YIQ_TO_RGB.to(turns.device) @ rot @ _RGB_TO_YIQ.to(turns.device)


def contrast_saturation_(y: Tensor, contrast: Tensor, saturation: Tensor) -> Tensor:
    """Contrast, then saturation, of float ``(N, 3, H, W)`` images in [0, 1], in place.

    torchvision's arithmetic (blend with the mean grey, then with each pixel's grey), one
    factor per image (``(N,)``), clamped to [0, 1] after each step; shared by
    :class:`RandomColour` and the batched path.
    """
    n, _, height, width = y.shape
    view = (n, 1, 1, 1)
    luma = LUMA.to(y.device, y.dtype)
    c = contrast.view(view)
    mean = (y.mean(dim=(2, 3)) @ luma).view(view)
    y.mul_(c).add_(mean * (1 - c)).clamp_(0.0, 1.0)
    s = saturation.view(view)
    grey = torch.matmul(luma, y.reshape(n, 3, -1)).view(n, 1, height, width)
    return y.mul_(s).add_(grey.mul_(1 - s)).clamp_(0.0, 1.0)


class RandomColour(torch.nn.Module):
    """Brightness, contrast, saturation and hue jitter on a float ``(3, H, W)`` image in
    [0, 1], with the arithmetic of the batched path (:class:`BatchAugment`).

    Brightness, contrast and saturation factors are drawn uniformly from
    ``[1 - jitter, 1 + jitter]``, as ColorJitter draws them, and applied in that fixed order
    (ColorJitter shuffles it); hue turns the chroma by up to ``hue`` of a circle in YIQ, a
    linear stand-in for ColorJitter's HSV shift. Every step clamps to [0, 1]. On float
    tensors this costs far less than ColorJitter on uint8, which was most of the per-image
    training transform's time (docs/benchmarks.md, "Training loader").
    """

    def __init__(self, jitter: float, hue: float):
        super().__init__()
        self.jitter, self.hue = float(jitter), float(hue)

    def forward(self, x: Tensor) -> Tensor:
        y = x.clone()
        if self.jitter > 0:
            lo = max(0.0, 1 - self.jitter)  # as ColorJitter and BatchAugment draw them
            b, c, sat = lo + (1 + self.jitter - lo) * torch.rand(3)
            y.mul_(b).clamp_(0.0, 1.0)
            y = contrast_saturation_(y[None], c.view(1), sat.view(1))[0]
        if self.hue > 0:
            turn = (2 * torch.rand(1) - 1) * self.hue
            y = torch.tensordot(hue_matrices(turn)[0].to(y.dtype), y, dims=1).clamp_(0.0, 1.0)
        return y

    def extra_repr(self) -> str:
        return f"jitter={self.jitter}, hue={self.hue}"


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
        from torchvision import tv_tensors

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
    import torchvision.transforms.v2 as T

    size = pre.size
    steps: list[Any] = []
    if aug.crop:
        steps.append(T.RandomResizedCrop(size, scale=aug.scale, ratio=aug.ratio, antialias=True))
    else:
        steps.append(T.Resize((size, size), antialias=True))
    if aug.flips:
        steps += [T.RandomHorizontalFlip(), T.RandomVerticalFlip()]
    steps.append(T.ToImage())
    if aug.rot90:
        steps.append(RandomRot90())
    steps.append(T.ToDtype(torch.float32, scale=True))
    if aug.color_jitter > 0 or aug.hue > 0:
        steps.append(RandomColour(aug.color_jitter, aug.hue))
    if aug.hed > 0:
        steps.append(HEDJitter(sigma=aug.hed, bias=aug.hed))
    # Plain tensors out, so collate and torch.save never see the tv_tensors subclass.
    steps += [T.Normalize(mean=list(pre.mean), std=list(pre.std)), T.ToPureTensor()]
    return T.Compose(steps)


MAX_ASPECT = 10.0
"""The longest side may be at most this many times the shortest in an image taken whole.

Resizing the short side to ``resize`` scales the long side with it: a 1 x 40,000 pixel image
(0.04 megapixels, well under any pixel limit) would become ``resize`` x 40,000 * ``resize``.
Inference refuses such images with a message; the evaluation transform also crops the long
side to this ratio first (see :class:`CapAspect`), so that no caller allocates more."""


class CapAspect(torch.nn.Module):
    """Centre-crops the long side to at most ``max_aspect`` times the short side.

    Placed before a short-side resize and a centre crop, it changes nothing the crop keeps
    (the crop is narrower than ``max_aspect`` short sides) and bounds the resized image at
    ``max_aspect * resize**2`` pixels whatever the input's shape.
    """

    def __init__(self, max_aspect: float = MAX_ASPECT):
        super().__init__()
        self.max_aspect = max_aspect

    def forward(self, image: Any) -> Any:
        import torchvision.transforms.v2.functional as F

        h, w = F.get_size(image)
        cap = max(1, math.floor(min(h, w) * self.max_aspect))
        if max(h, w) <= cap:
            return image
        return F.center_crop(image, [min(h, cap), min(w, cap)])

    def extra_repr(self) -> str:
        return f"max_aspect={self.max_aspect:g}"


def build_eval_transform(*, pre: Preprocessing) -> Callable[[Image.Image], Tensor]:
    """The deterministic per-image evaluation and inference pipeline.

    The resize is bounded: the long side is first centre-cropped to :data:`MAX_ASPECT` times
    the short one (:class:`CapAspect`), so memory after the resize is at most
    ``MAX_ASPECT * resize**2`` pixels whatever the image's shape, and the centre crop the
    model sees is unchanged.

    Args:
        pre: Resize, crop size and normalisation.

    Returns:
        A picklable callable taking an RGB PIL image (or uint8 tensor) and returning a
        normalised float32 tensor of shape ``(3, size, size)``.
    """
    import torchvision.transforms.v2 as T

    if pre.resize:
        steps: list[Any] = [CapAspect(), T.Resize(pre.resize, antialias=True),
                            T.CenterCrop(pre.size)]
    else:
        steps = [T.Resize((pre.size, pre.size), antialias=True)]
    steps += [T.ToImage(), T.ToDtype(torch.float32, scale=True),
              T.Normalize(mean=list(pre.mean), std=list(pre.std)), T.ToPureTensor()]
    return T.Compose(steps)



# ---------------------------------------------------------------------------------------------
# Tensor helpers: plotting and test-time augmentation
# ---------------------------------------------------------------------------------------------


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


def view_mean(probabilities: Callable, x: Tensor, views: int = 8):
    """The mean of ``probabilities(dihedral(x, k))`` over the first ``views`` symmetries of
    the square: 8-view test-time augmentation with ``views=8``, the plain view with 1.

    ``probabilities`` maps a batch to class probabilities (a tensor or an array); training's
    validation pass and :class:`~breast_cancer_detection.inference.Predictor` both average
    through here, so their TTA cannot drift apart.
    """
    if not 1 <= views <= 8:
        raise ValueError(f"views={views} must be in 1..8.")
    total = probabilities(x)
    for k in range(1, views):
        total = total + probabilities(dihedral(x, k))
    return total / views


def dihedral_inverse(k: int) -> int:
    """The ``j`` with ``dihedral(dihedral(x, k), j) == x``, e.g. to map TTA heat maps back."""
    if not 0 <= k <= 7:
        raise ValueError(f"k={k} must be in 0..7.")
    # Mirror-then-rotate is a reflection, which undoes itself; a pure rotation needs the
    # opposite turn.
    return k if k >= 4 else (4 - k) % 4

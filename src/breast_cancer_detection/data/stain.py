"""HED colour deconvolution and stain jitter (Tellez et al. 2018) on CPU or GPU tensors."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

# Ruifrok & Johnston (2001) stain vectors, one row per stain (haematoxylin, eosin, DAB), in
# optical density per unit concentration; the same matrix skimage.color.rgb2hed uses.
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29],
     [0.07, 0.99, 0.11],
     [0.27, 0.57, 0.78]],
    dtype=torch.float64,
)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)

# Floor on intensities before the log: black pixels get a large but finite optical density, so
# the round trip stays exact for every intensity above it.
EPS = 1e-6
"""The floor below which intensities are clamped before the optical-density log."""


def _work_dtype(x: Tensor) -> torch.dtype:
    # log(1e-6) and a 3x3 matrix product lose too much in half precision; compute in float32.
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _check_channels(x: Tensor) -> None:
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"Expected shape (..., 3, H, W), got {tuple(x.shape)}.")


def _mix(x: Tensor, matrix: Tensor) -> Tensor:
    """Each pixel's channel row vector times ``matrix``: ``out[c] = sum_s x[s] * matrix[s, c]``."""
    return torch.einsum("...shw,sc->...chw", x, matrix.to(device=x.device, dtype=x.dtype))


def rgb_to_hed(x: Tensor) -> Tensor:
    """RGB intensities to haematoxylin, eosin and DAB concentrations.

    Concentrations are in optical-density units (natural log): a stain at 1.0 lets through
    ``exp(-stain_vector)`` of the light in each RGB channel.

    Args:
        x: Float RGB tensor in [0, 1], shape ``(..., 3, H, W)``.

    Returns:
        Tensor of the same shape and dtype with the H, E and D channels; not clipped, so
        :func:`hed_to_rgb` inverts it exactly.
    """
    _check_channels(x)
    work = x.to(_work_dtype(x))
    od = -torch.log(work.clamp(min=EPS))
    return _mix(od, _HED_FROM_RGB).to(x.dtype)


def hed_to_rgb(x: Tensor) -> Tensor:
    """Haematoxylin, eosin and DAB concentrations back to RGB intensities.

    Args:
        x: HED tensor from :func:`rgb_to_hed`, shape ``(..., 3, H, W)``.

    Returns:
        RGB tensor of the same shape and dtype; not clamped, since concentrations pushed
        below zero give intensities above 1 that the caller may want to see.
    """
    _check_channels(x)
    work = x.to(_work_dtype(x))
    return torch.exp(-_mix(work, _RGB_FROM_HED)).to(x.dtype)


def uniform(shape: int | tuple[int, ...], low: float, high: float, *, device: torch.device,
             dtype: torch.dtype, generator: torch.Generator | None) -> Tensor:
    """Draws from U(low, high) of the given shape.

    The dtype is part of the draw, not a cast after it: one generator state gives other numbers
    in float32 than in float64, so callers name the dtype their draws must be reproducible in.
    """
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return low + (high - low) * u


def hed_jitter_maps(alpha: Tensor, beta: Tensor, dtype: torch.dtype = torch.float32
                    ) -> tuple[Tensor, Tensor]:
    """:func:`hed_jitter` as one affine map of log intensities per image.

    ``hed = H @ -log(rgb)`` and ``rgb' = exp(-R @ (alpha * hed + beta))`` (``H``, ``R`` the
    stain matrices, transposed from stain.py's row-vector layout) make
    ``log(rgb') = R diag(alpha) H @ log(rgb) - R @ beta``: one log, one 3x3 product, one exp.

    Args:
        alpha: ``(N, 3)`` stain scale factors.
        beta: ``(N, 3)`` stain offsets.

    Returns:
        ``(N, 3, 3)`` matrices and ``(N, 3, 1)`` offsets, for base-2 logs:
        ``log2(rgb') = M @ log2(rgb) + b``.
    """
    # float32 by default: float64 is missing on some devices (MPS), and 3x3 products lose
    # nothing that matters next to eight-bit images.
    to_hed = _HED_FROM_RGB.T.to(alpha.device, dtype)
    to_rgb = _RGB_FROM_HED.T.to(alpha.device, dtype)
    # The offset is in natural-log units; divided by ln 2 it offsets base-2 logs, which the
    # matrix maps unchanged.
    return to_rgb @ (alpha[:, :, None] * to_hed), -(to_rgb @ beta[:, :, None]) / math.log(2)


def hed_jitter(x: Tensor, *, sigma: float = 0.05, bias: float = 0.05,
               generator: torch.Generator | None = None) -> Tensor:
    """Randomly perturb the amount of each stain, independently per image.

    Each image's H, E and D concentrations ``c`` become ``alpha * c + beta`` with
    ``alpha ~ U(1 - sigma, 1 + sigma)`` and ``beta ~ U(-bias, bias)`` drawn per image and stain.

    Args:
        x: Float RGB tensor in [0, 1], shape ``(3, H, W)`` or ``(N, 3, H, W)`` (more leading
            dimensions are treated as more images), on any device.
        sigma: Half-width of the multiplicative range.
        bias: Half-width of the additive range, in optical-density units.
        generator: Source of the random draws; it must live on ``x.device``. None uses the
            global generator of that device.

    Returns:
        Jittered RGB tensor clamped to [0, 1], same shape, dtype and device as ``x``.
    """
    _check_channels(x)
    if sigma < 0 or bias < 0:
        raise ValueError(f"sigma={sigma} and bias={bias} must be non-negative.")
    images = x.reshape(-1, 3, *x.shape[-2:]).to(_work_dtype(x))
    n = images.shape[0]
    # Drawn in the working precision of the images, float64 for float64 input.
    draw = functools.partial(uniform, device=images.device, dtype=images.dtype,
                             generator=generator)
    alpha = draw((n, 3), 1.0 - sigma, 1.0 + sigma)
    beta = draw((n, 3), -bias, bias)
    # To stains, jittered, and back in one step: base-2 logs through one affine map.
    matrix, offset = hed_jitter_maps(alpha, beta, images.dtype)
    logs = images.clamp(min=EPS).log2().reshape(n, 3, -1)
    out = torch.baddbmm(offset, matrix, logs).exp2_().clamp_(0.0, 1.0)
    return out.reshape(x.shape).to(x.dtype)


class HEDJitter(torch.nn.Module):
    """:func:`hed_jitter` as a transform, applied to each image with probability ``p``.

    Takes float tensors in [0, 1] of shape ``(3, H, W)`` or ``(N, 3, H, W)``, so it goes after
    ``ToImage`` and ``ToDtype(torch.float32, scale=True)`` in a torchvision pipeline, or on a
    whole batch on the GPU. Uses the global generator, which DataLoader seeds per worker.
    """

    def __init__(self, sigma: float = 0.05, bias: float = 0.05, p: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p={p} must be in [0, 1].")
        if sigma < 0 or bias < 0:
            raise ValueError(f"sigma={sigma} and bias={bias} must be non-negative.")
        self.sigma = float(sigma)
        self.bias = float(bias)
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        """Jitter the stains of ``x``; see :func:`hed_jitter`."""
        if self.p <= 0.0:
            return x
        out = hed_jitter(x, sigma=self.sigma, bias=self.bias)
        if self.p >= 1.0:
            return out
        lead = x.shape[:-3]
        apply = torch.rand(lead, device=x.device) < self.p
        return torch.where(apply[..., None, None, None], out, x)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, bias={self.bias}, p={self.p}"

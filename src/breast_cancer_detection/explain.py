"""Grad-CAM: which parts of an image drove the model's answer, as an overlay."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .errors import UserError
from .inference import DEFAULT_TILE_FACTOR

if TYPE_CHECKING:
    from .inference import Predictor

# Our own ~50 lines rather than the `grad-cam` package: it installs from a source archive
# and pulls in OpenCV (a 60 MB wheel that requires numpy 2 and clashes with the
# opencv-python Colab already has) and ttach, for one colormap and one resize.


def find_target_layer(model: nn.Module) -> nn.Module:
    """The layer whose output Grad-CAM weighs: the last top-level child holding a convolution.

    That is the final feature map before global pooling: ``features`` for torchvision's
    DenseNet, EfficientNet, MobileNet and ConvNeXt and for our SmallCNN and PatchCNN,
    ``layer4`` for ResNets.

    Raises:
        UserError: the model has no convolution.
    """
    last = None
    for child in model.children():
        if any(isinstance(m, nn.Conv2d) for m in child.modules()):
            last = child
    if last is None:
        raise UserError(f"{type(model).__name__} has no convolutional layer; Grad-CAM needs a "
                        "CNN.")
    return last


class GradCAM:
    """Grad-CAM (Selvaraju et al., ICCV 2017) on one layer of a CNN.

    Each channel of the layer's output is weighted by the spatial mean of the gradient of the
    target class logit; the weighted sum, through a ReLU, is upsampled (bilinear) to the input
    size and scaled to [0, 1] per image. Because the gradients are averaged over space, the
    map shows where the features the class relies on are present, not which positions the
    model reads.

    Args:
        model: The classifier (left in eval mode; its weights get no gradients).
        layer: The layer to explain; default :func:`find_target_layer`.
    """

    def __init__(self, model: nn.Module, layer: nn.Module | None = None):
        self.model = model
        self.layer = layer if layer is not None else find_target_layer(model)

    def __call__(self, x: torch.Tensor, target: int | list[int] | torch.Tensor | None = None,
                 *, normalize: bool = True) -> np.ndarray:
        """Maps for a batch of model inputs.

        Args:
            x: ``(N, 3, H, W)`` preprocessed inputs.
            target: Class index (one for all, or one per image); None takes each image's
                highest logit.
            normalize: Scale each map to [0, 1]. Off, the maps keep the model's own units,
                so maps of several inputs (the tiles of one image) can be compared and
                stitched before one scaling for all.

        Returns:
            ``(N, H, W)`` float32, in [0, 1] when normalised; all zeros where no feature
            supports the class.
        """
        saved: dict[str, torch.Tensor] = {}

        def keep(module, inputs, output):
            saved["a"] = output
            # Passing on a copy keeps later in-place ops (DenseNet's final ReLU) from
            # overwriting the activations that the gradient is taken against.
            return output.clone()

        handle = self.layer.register_forward_hook(keep)
        self.model.eval()
        try:
            with torch.enable_grad():
                # Input gradients give the graph a root even when every weight is frozen.
                x = x.detach().float().requires_grad_(True)
                logits = self.model(x)
                if target is None:
                    t = logits.argmax(1)
                else:
                    t = torch.as_tensor(target, device=logits.device).long().expand(len(x))
                score = logits.gather(1, t[:, None]).sum()
                (grad,) = torch.autograd.grad(score, saved["a"])
        finally:
            handle.remove()
        a = saved["a"].detach().float()
        weights = grad.float().mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * a).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear",
                            align_corners=False)[:, 0]
        if not normalize:
            return cam.cpu().numpy().astype(np.float32)
        lo = cam.amin(dim=(1, 2), keepdim=True)
        span = cam.amax(dim=(1, 2), keepdim=True) - lo
        cam = torch.where(span > 0, (cam - lo) / span.clamp_min(1e-12), torch.zeros_like(cam))
        return cam.cpu().numpy().astype(np.float32)


def overlay(image, cam: np.ndarray, *, alpha: float = 0.45, cmap: str | None = None
            ) -> Image.Image:
    """Lays a map in [0, 1] over an image in colour; NaN (no evidence: a part the model did
    not see) leaves the image as it is.

    Args:
        image: PIL image or array; the map is resized to it.
        cam: ``(h, w)`` map in [0, 1], NaN where there is no value.
        alpha: Weight of the colour map against the image.
        cmap: A matplotlib colormap name; default :data:`~breast_cancer_detection.plots.
            CAM_CMAP` (viridis: dark purple low, yellow high, readable with the common colour
            blindnesses).
    """
    from matplotlib import colormaps

    from .data.datasets import open_rgb
    from .plots import CAM_CMAP

    base = open_rgb(image, max_pixels=None)
    cam = np.asarray(cam, np.float32)
    known = np.isfinite(cam)
    heat = Image.fromarray(np.clip(np.where(known, cam, 0) * 255.0, 0, 255).astype(np.uint8), "L")
    heat = np.asarray(heat.resize(base.size, Image.Resampling.BILINEAR), np.float32) / 255.0
    shown = Image.fromarray(known.astype(np.uint8) * 255, "L")
    shown = np.asarray(shown.resize(base.size, Image.Resampling.NEAREST)) > 0
    colour = colormaps[cmap or CAM_CMAP](heat)[..., :3] * 255.0
    weight = alpha * shown[..., None]
    mixed = (1.0 - weight) * np.asarray(base, np.float32) + weight * colour
    return Image.fromarray(np.clip(mixed, 0, 255).round().astype(np.uint8))


CAM_MAX_SIDE = 1024
"""Long side, in pixels, of the frame a tiled image's map is drawn in (at most: never finer
than the model's own input resolution)."""


def _picture(x: torch.Tensor, pre) -> Image.Image:
    from .data.transforms import denormalize

    arr = denormalize(x, pre).permute(1, 2, 0).numpy() * 255.0
    return Image.fromarray(arr.round().astype(np.uint8))


def model_view(predictor: Predictor, image) -> tuple[Image.Image, torch.Tensor]:
    """What the model sees of ``image`` predicted whole: short side resized, centre-cropped.

    Returns:
        The view as a picture, and the normalised model input ``(3, size, size)``.
    """
    from .data.datasets import open_rgb

    x = predictor.transform(open_rgb(image, max_pixels=predictor.max_pixels))
    return _picture(x, predictor.pre), x


def _decide(predictor: Predictor, probs: np.ndarray) -> int:
    """The class index at the predictor's threshold for mean probabilities ``probs``."""
    if not np.isfinite(probs).all():
        raise UserError("the model produced non-finite output (NaN or infinity) for this image, "
                        "so there is no decision to explain; check the checkpoint.")
    return int(probs[1] >= predictor.threshold)


def _shrunk(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` with its long side at most ``max_side`` pixels."""
    scale = min(1.0, max_side / max(image.size))
    if scale == 1.0:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


def seen_box(width: int, height: int, pre) -> tuple[float, float, float, float]:
    """``(left, top, width, height)``, in image pixels, of the part of an image predicted
    whole that the model's input shows: the centre square the evaluation transform crops
    after resizing the short side to ``pre.resize``; the whole image without a resize (it is
    squashed to a square)."""
    if not pre.resize:
        return 0.0, 0.0, float(width), float(height)
    side = min(width, height) * pre.size / pre.resize
    return (width - side) / 2, (height - side) / 2, side, side


def explain(predictor: Predictor, image, target: int | None = None, *,
            tile_factor: float | None = DEFAULT_TILE_FACTOR, tile_size: int | None = None,
            max_side: int = CAM_MAX_SIDE, frame: str = "image"
            ) -> tuple[Image.Image, np.ndarray]:
    """Grad-CAM of one image, on the inputs that made the decision, drawn in the image's
    own frame.

    The image is prepared exactly as :meth:`Predictor.predict` prepares it (same tiling
    settings, same refusals). An image predicted whole is explained on the model's input (a
    centre crop of the resized image), and the map is placed over the part of the image that
    input shows (:func:`seen_box`); ``frame="model"`` returns the model's input and its map
    instead. A tiled image is explained tile by tile: each tile's map, in the model's units,
    is laid over the part of the image that tile's input covers, and overlapping tiles are
    blended with weights that fall smoothly to their edges, so no seams show; the whole is
    scaled to [0, 1] once, so tiles with more evidence show hotter. Parts of the image no
    model input showed are NaN (``overlay`` and ``plot_explanation`` leave them uncoloured).
    The frame is the image shrunk to at most ``max_side`` pixels on its long side (a tiled
    one also to the model's resolution).

    Grad-CAM needs PyTorch's gradients: pass the PyTorch predictor and the ``target`` that
    the scoring backend's label gave, so that the explanation is of the answer given.

    Args:
        predictor: A PyTorch-backed predictor.
        image: Path, PIL image or array.
        target: Class index to explain; None takes the label at the predictor's threshold.
        tile_factor: As for :meth:`Predictor.predict`; pass what the prediction used.
        tile_size: As for :meth:`Predictor.predict`.
        max_side: Longest side of the frame.
        frame: ``image`` (default) or ``model`` (an image predicted whole: the model's input).

    Returns:
        The view (the image, or the model's input) and its map of the view's size, in
        [0, 1] and NaN where the model saw nothing; ``overlay(*explain(p, im))`` and
        ``plot_explanation(*explain(p, im))`` draw them.

    Raises:
        UserError: the predictor runs an ONNX model (no gradients), the model output is
            not finite, or ``frame`` is neither of the two.
        ImageError: the image is refused (unreadable, too small, bad shape...).
    """
    from .data.datasets import ImageError, open_rgb
    from .inference import Preparer

    if predictor.backend != "torch":
        raise UserError("Grad-CAM needs gradients: load the PyTorch checkpoint (.pt), not the "
                        "ONNX export.")
    if frame not in ("image", "model"):
        raise UserError(f"frame={frame!r}: use 'image' or 'model'.")
    preparer = Preparer(predictor.pre, predictor.transform, max_pixels=predictor.max_pixels,
                         tile_factor=tile_factor, tile_size=tile_size)
    prepared = preparer(0, image)
    if prepared.error is not None:
        raise ImageError(prepared.error)
    if prepared.x is None:
        return _explain_tiles(predictor, preparer, prepared, target, max_side)
    x = prepared.x.to(predictor.device)
    if target is None:
        target = _decide(predictor, predictor.probabilities(x)[0])
    cam = GradCAM(predictor.model)(x, target)[0]
    if frame == "model":
        return _picture(prepared.x[0], predictor.pre), cam
    view = _shrunk(open_rgb(image, max_pixels=predictor.max_pixels), max_side)
    scale = view.width / prepared.size[0]
    left, top, w, h = (v * scale for v in seen_box(*prepared.size, predictor.pre))
    x0, y0 = max(0, round(left)), max(0, round(top))
    x1, y1 = min(view.width, max(x0 + 1, round(left + w))), min(view.height,
                                                                max(y0 + 1, round(top + h)))
    placed = np.full((view.height, view.width), np.nan, np.float32)
    placed[y0:y1, x0:x1] = F.interpolate(torch.from_numpy(cam)[None, None],
                                         size=(y1 - y0, x1 - x0), mode="bilinear",
                                         align_corners=False)[0, 0].numpy()
    return view, placed


def _edge_window(n: int) -> torch.Tensor:
    """Weights over ``n`` pixels that rise from near 0 at both edges to 1 in the middle (a
    sine arch, never 0), for blending overlapping tiles without seams."""
    return torch.sin(torch.pi * (torch.arange(n, dtype=torch.float32) + 0.5) / n)


def _explain_tiles(predictor: Predictor, preparer, prepared, target: int | None,
                   max_side: int, chunk: int = 32) -> tuple[Image.Image, np.ndarray]:
    """The blended map of a tiled image (see :func:`explain`)."""
    pre = predictor.pre
    rgb = prepared.image  # (3, H, W) uint8
    height, width = rgb.shape[1:]
    # The part of a tile its model input shows: the centre crop of the resized tile.
    seen = preparer.tile * pre.size / pre.resize if pre.resize else float(preparer.tile)
    margin = (preparer.tile - seen) / 2
    scale = min(pre.size / seen, max_side / max(height, width), 1.0)
    frame = (max(1, round(height * scale)), max(1, round(width * scale)))
    if target is None:
        probs = np.concatenate([predictor.probabilities(x, batch_size=chunk)
                                for x in preparer.tiles(prepared, chunk)])
        target = _decide(predictor, probs.mean(0))
    total = torch.zeros(frame)
    weight = torch.zeros(frame)
    gradcam = GradCAM(predictor.model)
    boxes = iter(prepared.boxes or [])
    for x in preparer.tiles(prepared, chunk):
        maps = torch.from_numpy(gradcam(x.to(predictor.device), target, normalize=False))
        for m, (y0, x0) in zip(maps, boxes):
            top, left = round((y0 + margin) * scale), round((x0 + margin) * scale)
            bottom = max(top + 1, min(frame[0], round((y0 + margin + seen) * scale)))
            right = max(left + 1, min(frame[1], round((x0 + margin + seen) * scale)))
            part = F.interpolate(m[None, None], size=(bottom - top, right - left),
                                 mode="bilinear", align_corners=False, antialias=True)[0, 0]
            w = _edge_window(bottom - top)[:, None] * _edge_window(right - left)[None, :]
            total[top:bottom, left:right] += w * part
            weight[top:bottom, left:right] += w
    covered = weight > 0
    cam = torch.full(frame, float("nan"))
    cam[covered] = total[covered] / weight[covered]
    lo, hi = cam[covered].min(), cam[covered].max()
    cam[covered] = (cam[covered] - lo) / (hi - lo).clamp_min(1e-12) if hi > lo else 0.0
    view = Image.fromarray(rgb.permute(1, 2, 0).numpy())
    if view.size != (frame[1], frame[0]):
        view = view.resize((frame[1], frame[0]), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return view, cam.numpy().astype(np.float32)

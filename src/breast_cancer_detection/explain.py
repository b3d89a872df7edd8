"""Grad-CAM: which parts of an image drove the model's answer, as an overlay."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .errors import UserError

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

    def __call__(self, x: torch.Tensor, target: int | list[int] | torch.Tensor | None = None
                 ) -> np.ndarray:
        """Maps for a batch of model inputs.

        Args:
            x: ``(N, 3, H, W)`` preprocessed inputs.
            target: Class index (one for all, or one per image); None takes each image's
                highest logit.

        Returns:
            ``(N, H, W)`` float32 in [0, 1]; all zeros where no feature supports the class.
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
        lo = cam.amin(dim=(1, 2), keepdim=True)
        span = cam.amax(dim=(1, 2), keepdim=True) - lo
        cam = torch.where(span > 0, (cam - lo) / span.clamp_min(1e-12), torch.zeros_like(cam))
        return cam.cpu().numpy().astype(np.float32)


def overlay(image, cam: np.ndarray, *, alpha: float = 0.45, cmap: str = "jet") -> Image.Image:
    """Lays a map in [0, 1] over an image in colour (jet: blue low, red high).

    Args:
        image: PIL image or array; the map is resized to it.
        cam: ``(h, w)`` map in [0, 1].
        alpha: Weight of the colour map against the image.
        cmap: A matplotlib colormap name.
    """
    from matplotlib import colormaps

    from .data.datasets import open_rgb

    base = open_rgb(image, max_pixels=None)
    heat = Image.fromarray(np.clip(cam * 255.0, 0, 255).astype(np.uint8), "L")
    heat = np.asarray(heat.resize(base.size, Image.Resampling.BILINEAR), np.float32) / 255.0
    colour = colormaps[cmap](heat)[..., :3] * 255.0
    mixed = (1.0 - alpha) * np.asarray(base, np.float32) + alpha * colour
    return Image.fromarray(np.clip(mixed, 0, 255).round().astype(np.uint8))


def model_view(predictor: Predictor, image) -> tuple[Image.Image, torch.Tensor]:
    """What the model sees of ``image`` predicted whole: short side resized, centre-cropped.

    Returns:
        The view as a picture, and the normalised model input ``(3, size, size)``.
    """
    from .data.datasets import open_rgb
    from .data.transforms import denormalize

    x = predictor.transform(open_rgb(image, max_pixels=predictor.max_pixels))
    arr = denormalize(x, predictor.pre).permute(1, 2, 0).numpy() * 255.0
    return Image.fromarray(arr.round().astype(np.uint8)), x


def explain(predictor: Predictor, image, target: int | None = None
            ) -> tuple[Image.Image, np.ndarray]:
    """Grad-CAM of one image, on the model's view of it (see :func:`model_view`).

    Args:
        predictor: A PyTorch-backed predictor.
        image: Path, PIL image or array.
        target: Class index to explain; None takes the label at the predictor's threshold.

    Returns:
        The view and its ``(size, size)`` map in [0, 1]; ``overlay(*explain(p, im))`` draws
        them.

    Raises:
        UserError: the predictor runs an ONNX model (no gradients).
    """
    if predictor.backend != "torch":
        raise UserError("Grad-CAM needs gradients: load the PyTorch checkpoint (.pt), not the "
                        "ONNX export.")
    view, x = model_view(predictor, image)
    x = x.unsqueeze(0).to(predictor.device)
    if target is None:
        p_malignant = predictor._probabilities(x)[0, 1]
        target = int(p_malignant >= predictor.threshold)
    return view, GradCAM(predictor.model)(x, target)[0]

"""Models by name: one registry for torchvision, our small CPU networks, and timm."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .imagenet import WeightsError

__all__ = ["WeightsError", "create_model", "freeze_early_blocks", "head_name", "list_models",
           "read_state_dict"]

TORCHVISION_MODELS = (
    "densenet121", "resnet18", "resnet34", "resnet50", "efficientnet_b0", "mobilenet_v2",
    "mobilenet_v3_large", "mobilenet_v3_small", "convnext_tiny",
)

PACKAGE_MODELS = ("efficientnet_lite0",)
"""Architectures whose network code comes from a PyPI package (``efficientnet-lite-pytorch``)."""


class SmallCNN(nn.Module):
    """A compact VGG-style network for small patches on a CPU, and for tests.

    GroupNorm instead of BatchNorm keeps its gradients independent of how a batch is split,
    so one process and two data-parallel processes train it to the same weights.
    """

    def __init__(self, num_classes: int = 2, width: int = 16, depth: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(depth):
            c_out = width * 2**i
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.GroupNorm(min(8, c_out // 4), c_out),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                nn.GroupNorm(min(8, c_out // 4), c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class PatchCNN(nn.Module):
    """A plain BatchNorm CNN for 96 px patches on a CPU (the ``pcam-cpu`` recipe).

    A stride-2 stem halves the patch before any wide layer: on two CPU cores that is the
    difference between ~100 and ~500 training images/s at 96 px, for the same 1.2 M weights.
    """

    def __init__(self, num_classes: int = 2, width: int = 32, centre: bool = False):
        super().__init__()
        self.centre = centre

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
                    nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            *block(w, w, 2), *block(w, 2 * w, 2), *block(2 * w, 4 * w, 2),
            *block(4 * w, 8 * w, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(8 * w * (2 if centre else 1), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = torch.flatten(self.pool(f), 1)
        if self.centre:
            # The middle third of the feature map, pooled on its own: the part of a PCam patch
            # its label speaks of (tumour in the centre 32 of 96 px; at stride 16 the centre
            # 2 x 2 cells of 6 x 6). Global pooling alone cannot tell centre from rim.
            h, w = f.shape[-2:]
            ch, cw = max(1, h // 3), max(1, w // 3)
            top, left = (h - ch) // 2, (w - cw) // 2
            middle = f[..., top:top + ch, left:left + cw].mean(dim=(2, 3))
            pooled = torch.cat([pooled, middle], dim=1)
        return self.classifier(pooled)


# Our own architectures: name -> constructor(num_classes). No pretrained weights exist for them.
_LOCAL: dict[str, Callable[[int], nn.Module]] = {
    "tiny": lambda n: SmallCNN(n, width=8, depth=2),
    "small_cnn": lambda n: SmallCNN(n, width=32, depth=4),
    "patch_cnn": lambda n: PatchCNN(n, width=32),
    "patch_cnn_wide": lambda n: PatchCNN(n, width=48),
    "patch_cnn_centre": lambda n: PatchCNN(n, width=32, centre=True),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model` (plus any timm name when timm is installed)."""
    return sorted(_LOCAL) + list(TORCHVISION_MODELS) + list(PACKAGE_MODELS)


def _efficientnet_lite0(num_classes: int) -> nn.Module:
    from .imagenet import KNOWN

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise UserError("efficientnet_lite0 needs its network code: "
                        f"`{KNOWN['efficientnet_lite0'].install}`.") from None
    return EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = (name, m)
    if last is None:
        raise ValueError(f"{type(model).__name__} has no Linear layer to use as the head")
    return last


def _replace_head(model: nn.Module, num_classes: int) -> str:
    """Swaps the final Linear layer for a new one with ``num_classes`` outputs.

    Returns:
        The head's module name (its parameters are what a frozen backbone still trains).
    """
    name, old = _last_linear(model)
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], nn.Linear(old.in_features, num_classes))
    return name


def head_name(model: nn.Module) -> str:
    """The module name of the model's classification head."""
    return _last_linear(model)[0]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a plain state dict, or the ``model`` entry of one of our checkpoints."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file.")

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise WeightsError(why_unloadable(path, e)) from e

    obj = state_dict_of(obj)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict (name -> tensor).")
    # Weights saved from a DDP or compiled model carry a prefix on every key.
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Loads every tensor whose name and shape fit; the head may differ, nothing else may."""
    own = model.state_dict()
    head = head_name(model)
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in fitting and not k.startswith(head + ".")]
    if missing:
        raise WeightsError(
            f"{source} does not fit {type(model).__name__}: {len(missing)} tensors missing or of "
            f"another shape (first: {missing[0]}). Was it saved from another architecture?"
        )
    model.load_state_dict(fitting, strict=False)


def create_model(name: str = "densenet121", num_classes: int = 2, pretrained: bool = False,
                 weights: str | Path | None = None, freeze_backbone: bool = False,
                 freeze_early: int = 0, **kwargs) -> nn.Module:
    """Creates a classifier by name with a fresh ``num_classes`` head.

    Args:
        name: One of :func:`list_models`, or a timm model name when timm is installed.
        num_classes: Outputs of the new head.
        pretrained: Start from ImageNet weights, found by :func:`bcd.imagenet.resolve`
            (torchvision's cache, an installed weights package, or a download), each file
            checked by its SHA-256.
        weights: A local state dict or checkpoint to start from instead; nothing is fetched.
        freeze_backbone: Train only the head.
        freeze_early: Keep the first this many blocks of the backbone as loaded
            (:func:`freeze_early_blocks`).
        **kwargs: Passed to the architecture; ``None`` values are dropped so a CLI default
            never overrides the architecture's own.

    Raises:
        WeightsError: the weights cannot be fetched or do not fit; the message names
            ``--weights PATH`` and ``--no-pretrained``.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    # Weights of one's own replace ImageNet's: nothing is fetched for them.
    imagenet = pretrained and weights is None
    if name in _LOCAL:
        if pretrained:
            raise WeightsError(f"{name} has no pretrained weights; use --no-pretrained.")
        model = _LOCAL[name](num_classes)
    elif name in TORCHVISION_MODELS or name in PACKAGE_MODELS:
        if name in PACKAGE_MODELS:
            model = _efficientnet_lite0(1000)
        else:
            from torchvision.models import get_model

            model = get_model(name, weights=None, **kwargs)
        if imagenet:
            from . import imagenet as imagenet_weights

            state, where = imagenet_weights.load(name)
            try:
                model.load_state_dict(state)
            except RuntimeError as e:
                raise WeightsError(f"{where.path} does not load into {name}: {e}") from e
        _replace_head(model, num_classes)
    else:
        try:
            import timm
        except ImportError:
            raise UserError(f"unknown model {name!r}; choose from {', '.join(list_models())}, "
                            "or `pip install timm` for timm's models.") from None
        if not timm.is_model(name):
            raise UserError(f"unknown model {name!r} (neither torchvision's nor timm's).")
        model = timm.create_model(name, pretrained=imagenet, num_classes=num_classes, **kwargs)
    if weights is not None:
        if name in TORCHVISION_MODELS or name in PACKAGE_MODELS:
            from .imagenet import verify

            verify(Path(weights), name)  # a known file under its own name: by its hash
        load_backbone_weights(model, read_state_dict(weights), str(weights))
    if freeze_early:
        freeze_early_blocks(model, freeze_early, name)
    if freeze_backbone:
        head = head_name(model)
        for pname, p in model.named_parameters():
            p.requires_grad = pname.startswith(head + ".")
    return model


def freeze_early_blocks(model: nn.Module, blocks: int, name: str = "") -> None:
    """Stops training the parameters of ``model.features[:blocks]``.

    Their BatchNorm layers stay in training mode, so the running statistics still adapt to
    the new images; autograd skips their backward pass, since nothing before them trains.

    Raises:
        UserError: the model has no ``features`` sequence of blocks, or ``blocks`` would
            freeze all of it (``--freeze-backbone`` is that).
    """
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise UserError(f"--freeze-early needs a backbone built as a sequence of blocks "
                        f"(model.features), which {name or type(model).__name__} is not; "
                        "mobilenet_v2, mobilenet_v3_*, efficientnet_b0, densenet121 and "
                        "convnext_tiny are. Drop --freeze-early.")
    if blocks >= len(features):
        raise UserError(f"--freeze-early {blocks}: {name or type(model).__name__} has "
                        f"{len(features)} blocks; freeze fewer, or use --freeze-backbone to "
                        "train only the head.")
    for p in features[:blocks].parameters():
        p.requires_grad = False


def why_unloadable(path: Path, e: Exception) -> str:
    """What to tell the user when ``torch.load(path, weights_only=True)`` raised ``e``.

    Never torch's own text: it suggests loading with ``weights_only=False``, which runs any
    code a hostile file holds.
    """
    if "GLOBAL" in str(e):  # torch's wording for a pickled class or function
        return (f"{path} holds pickled Python objects, which could run code when loaded; it "
                "was refused. Use a checkpoint written by `bcd train`.")
    return (f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}): the file is "
            "damaged, truncated, or not a .pt file. Download it again, or train one with "
            "`bcd train`.")


def state_dict_of(obj: Any) -> Any:
    """The weights inside a raw loaded object: a checkpoint's, or the object itself."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"]
    return obj

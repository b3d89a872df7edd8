"""The training run's settings: one typed dataclass, YAML presets, and checks with fixes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(UserError, ValueError):
    """A setting, or a combination of settings, that cannot work; the message says the fix."""


def dataclass_from_dict(cls: type, d: dict[str, Any], error: type[Exception] = ConfigError):
    """``cls(**d)``, naming any unknown key instead of ignoring it; missing keys keep defaults
    (so settings saved before a field existed still load)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise error(f"unknown {cls.__name__} setting(s) {', '.join(unknown)}; known: "
                    f"{', '.join(sorted(known))}.")
    return cls(**d)


@dataclass
class TrainConfig:
    """Everything a training run needs; written to ``runs/NAME/config.yaml`` and checkpoints."""

    # Data
    data: str | None = None
    """Data folder (BreakHis tree or ImageFolder); None downloads BreakHis into ``data/``."""
    split: str | None = None
    """Split CSV from ``bcd split``; None makes a patient-disjoint one and saves it in the run."""
    val: float = 0.15
    """Validation share when the split is made here."""
    test: float = 0.15
    """Test share when the split is made here (never trained or selected on)."""
    magnification: list[str] | None = None
    """Keep only these magnifications, e.g. ``40X`` (in YAML a list: ``[40X]``)."""
    group_by: str = "patient"
    """What counts as a patient in patient-level metrics: ``patient`` (numeric BreakHis id)
    or ``slide`` (each slide folder); splits keep each numeric id in one subset either way."""
    mpp: float | None = None
    """Micrometres per pixel of the training images, stored in the checkpoint so that ``bcd
    slide`` cuts slide tiles at that scale (PatchCamelyon: 0.972)."""

    # Model
    model: str = "densenet121"
    """Architecture name from ``bcd.list_models()`` (torchvision, or timm when installed)."""
    pretrained: bool = True
    """Start from ImageNet weights (downloaded once and cached)."""
    weights: str | None = None
    """Local state dict or checkpoint to start from instead of downloading."""
    freeze_backbone: bool = False
    """Train only the new head, as the original notebook did."""
    freeze_early: int = 0
    """Keep the ImageNet weights of the backbone's first N blocks (``model.features[:N]``)
    for the whole run; their BatchNorm statistics still adapt. Their backward pass is skipped,
    and so is keeping their activations for it (docs/results.md: less memory)."""
    size: int = 224
    """Side of the square the model sees."""
    resize: int | None = 256
    """Evaluation: short side resized to this, then centre-cropped to ``size``."""
    augment: dict[str, Any] = field(default_factory=dict)
    """Overrides of :class:`bcd.data.transforms.Augmentation` (scale, flips, rot90, hed...); on
    the command line ``--aug hed=0.1 --aug rot90=false``."""

    # Optimisation
    epochs: int = 20
    """Passes over the training images (the most, when ``time_budget`` is set)."""
    early_crop: int | None = None
    """Train the first ``early_fraction`` of the epochs on a random ``early_crop``-px window of
    each image, cut at the image's own scale (no resizing), and the rest on whole images:
    a step costs about ``(early_crop / size)**2`` as much. For PatchCamelyon's 96 px patches,
    whose label speaks of the centre 32 px, every 64 px window still holds that centre.
    Validation always sees whole images. None trains on whole images throughout."""
    early_fraction: float = 0.5
    """Share of the epochs trained on ``early_crop`` windows (rounded to whole epochs)."""
    time_budget: str | None = None
    """Wall-clock budget for the whole run, e.g. ``30m``, ``1h``, ``900s``: the first steps
    are timed and the epochs (at most ``epochs``) sized so that the schedule, validation
    included, ends inside it. A bare number is seconds."""
    batch_size: int = 32
    """Images per step, per process (per GPU under torchrun)."""
    lr: float = 3e-4
    """AdamW learning rate after the warm-up, then decayed along a cosine."""
    weight_decay: float = 0.05
    """AdamW weight decay of the weight matrices and kernels (not biases or norms)."""
    warmup_epochs: float = 1.0
    """Linear warm-up before the cosine decay, in epochs (fractions allowed)."""
    ema: float | None = None
    """Keep an exponential moving average of the weights with this decay per step (e.g.
    0.999): validation, ``best.pt`` and the weights a run ships are the average (BatchNorm
    statistics included); None uses the trained weights as they are."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy loss; 0 trains on hard labels."""
    mixup: float = 0.0
    """Mixup: each training batch is blended with a shuffled copy of itself, by a weight drawn
    from Beta(mixup, mixup) and kept at 0.5 or more, and its loss likewise (e.g. 0.2); 0
    trains on the images as they are."""
    balance: str = "loss"
    """Class imbalance: ``loss`` (weighted loss), ``sampler`` (balanced sampling), ``patient``
    (sampling that gives each class half the draws and each of its patients an equal share,
    for data sets where a few patients hold most images), ``none``."""
    tta: bool = False
    """Also score the final model on validation with test-time augmentation (8 flips and
    rotations averaged); epochs are validated on one view, which is 8x cheaper."""
    early_stop: int | None = None
    """Stop after this many epochs without a better validation AUC; None never stops early."""
    seed: int = 0
    """Seed of the split made here, the initial weights and the order of the images."""

    # Machine
    device: str = "auto"
    """``auto`` (CUDA when present), ``cuda``, ``cuda:1``, ``cpu``."""
    amp: str = "auto"
    """Mixed precision: ``auto`` (CUDA: bf16 if supported, else fp16; a CPU: bf16 only where it
    computes bf16 natively (AVX512-BF16 or AMX), else float32), ``bf16``, ``fp16`` (CUDA),
    ``off``."""
    expects_gpu: bool = False
    """The recipe was sized for a CUDA GPU: without one, training times its first steps and
    says how long the whole run would take before it starts."""
    channels_last: bool = True
    """Channels-last memory layout: faster convolutions on recent GPUs and with oneDNN on CPUs."""
    compile: bool = False
    """``torch.compile`` the model (CUDA; slower start, faster steps)."""
    workers: int = 2
    """DataLoader worker processes."""
    cache: str = "auto"
    """Decoded-image cache from ``bcd prepare``: ``auto`` (use it when present and fresh),
    ``off``, or a cache folder (then a stale cache is an error)."""
    batch_augment: str = "auto"
    """Augment whole batches on the device instead of per image in the workers: ``auto`` (on
    with CUDA and a cache), ``on``, ``off``. Reads the prepared cache, which ``on`` builds on
    first use (``bcd prepare`` does it ahead)."""
    max_bad_fraction: float = 0.01
    """Unreadable images are skipped; the run fails when more than this share is bad."""

    # Output
    runs_dir: str = "runs"
    """Folder that holds the run folders."""
    name: str | None = None
    """Run folder name under ``runs_dir``; None makes ``MODEL-YYYYmmdd-HHMMSS``."""
    tensorboard: bool = False
    """Also log to TensorBoard in ``RUN/tensorboard`` (``pip install tensorboard``)."""
    log_every: int = 10
    """Steps between progress-bar updates (each one waits for the GPU)."""

    def __post_init__(self) -> None:
        if not (0 <= self.val < 1 and 0 <= self.test < 1 and self.val + self.test < 1):
            raise ConfigError(f"val={self.val} and test={self.test}: each must be in [0, 1) and "
                              "their sum under 1.")
        if self.group_by not in ("patient", "slide"):
            raise ConfigError(f"group_by={self.group_by!r}: use 'patient' or 'slide'.")
        if self.balance not in ("loss", "sampler", "patient", "none"):
            raise ConfigError(f"balance={self.balance!r}: use 'loss', 'sampler', 'patient' or "
                              "'none'.")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ConfigError(f"amp={self.amp!r}: use 'auto', 'bf16', 'fp16' or 'off'.")
        if self.batch_augment not in ("auto", "on", "off"):
            raise ConfigError(f"batch_augment={self.batch_augment!r}: use 'auto', 'on' or 'off'.")
        if self.batch_augment == "on" and self.cache == "off":
            raise ConfigError("batch_augment=on reads fixed-size images from the prepared "
                              "cache: drop cache=off, or set batch_augment=off.")
        if self.time_budget is not None:
            parse_duration(self.time_budget)  # a bad budget fails here, with the fix
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be at least 1.")
        if self.early_crop is not None and not 32 <= self.early_crop < self.size:
            raise ConfigError(f"early_crop={self.early_crop}: windows must be at least 32 px "
                              f"and smaller than size={self.size}, or null for whole images.")
        if not 0 <= self.early_fraction < 1:
            raise ConfigError(f"early_fraction={self.early_fraction}: use a share in [0, 1), "
                              "e.g. 0.5 (the rest of the epochs see whole images).")
        if not self.mixup >= 0:
            raise ConfigError(f"mixup={self.mixup}: the Beta concentration must be 0 (off) or "
                              "positive, e.g. 0.2.")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ConfigError(f"ema={self.ema}: the decay must be between 0 and 1, e.g. 0.999, "
                              "or null for no averaging.")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be positive.")
        if self.mpp is not None and not self.mpp > 0:
            raise ConfigError(f"mpp={self.mpp}: micrometres per pixel must be positive "
                              "(0.972 for PatchCamelyon), or null when unknown.")
        if self.weights and self.pretrained:
            # Local weights replace the download; say so rather than guess which one was meant.
            self.pretrained = False
        if self.freeze_backbone and not (self.pretrained or self.weights):
            raise ConfigError("freeze_backbone trains only the head, which needs a pretrained "
                              "backbone: drop --freeze-backbone or give --weights PATH.")
        if self.freeze_early < 0:
            raise ConfigError(f"freeze_early={self.freeze_early} must be 0 (off) or a number of "
                              "blocks, e.g. 4.")
        if self.freeze_early and not (self.pretrained or self.weights):
            raise ConfigError("freeze_early keeps the first blocks' pretrained weights, which "
                              "needs a pretrained backbone: drop --freeze-early or give "
                              "--pretrained or --weights PATH.")
        if self.resize is not None and self.resize < self.size:
            raise ConfigError(f"resize={self.resize} is smaller than size={self.size}; set "
                              f"resize >= size, or resize: null to resize straight to size.")
        if self.size < 32:
            raise ConfigError(f"size={self.size} is too small for these networks; use >= 32.")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError("max_bad_fraction must be between 0 and 1.")
        if self.magnification:
            self.magnification = [str(m).upper() if str(m).upper().endswith("X")
                                  else f"{m}X" for m in self.magnification]

    def window(self, epoch: int) -> int | None:
        """The ``early_crop`` window epoch ``epoch`` (0-based) trains on, or None (whole)."""
        if self.early_crop is None or epoch >= self.early_epochs:
            return None
        return self.early_crop

    @property
    def early_epochs(self) -> int:
        """How many of the ``epochs`` train on ``early_crop`` windows (0 without)."""
        if not self.early_crop:
            return 0
        # Rounded half up, and the last epoch always whole (BatchNorm sees whole images).
        return min(self.epochs - 1, math.floor(self.early_fraction * self.epochs + 0.5))

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for YAML and for ``torch.load(weights_only=True)``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Builds a config, naming any unknown key instead of ignoring it."""
        return dataclass_from_dict(cls, d)

    def save(self, path: str | Path) -> Path:
        """Writes the settings as YAML."""
        path = Path(path)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``90``, ``90s``, ``30m``, ``1.5h`` (a bare number is seconds).

    Raises:
        ConfigError: anything else, or a duration that is not positive.
    """
    units = {"s": 1, "m": 60, "h": 3600}
    raw = str(text).strip().lower()
    number, unit = (raw[:-1], raw[-1]) if raw[-1:] in units else (raw, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise ConfigError(f"time budget {text!r}: use a number with s, m or h, e.g. 30m."
                          ) from None
    if not seconds > 0:
        raise ConfigError(f"time budget {text!r} must be positive.")
    return seconds


def list_presets() -> list[str]:
    """Names of the bundled presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Reads a preset by name (``cpu-smoke``) or from a YAML file path.

    A preset may start from another: ``base: NAME`` (a bundled name or a path) takes that
    preset's settings, and its own settings replace those (``augment`` as a whole).
    """
    p = Path(name_or_path)
    if not p.suffix:
        p = PRESET_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        raise ConfigError(f"no preset {name_or_path!r}; bundled: {', '.join(list_presets())}, "
                          "or give a path to a YAML file.")
    d = yaml.safe_load(p.read_text()) or {}
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: a preset must be a mapping of setting: value.")
    base = d.pop("base", None)
    if base is None:
        return d
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{p}: base: must name one preset, e.g. base: pcam-cpu.")
    if str(p.resolve()) in _seen:
        raise ConfigError(f"{p}: its base presets lead back to it ({' -> '.join(_seen)}).")
    if Path(base).suffix and not Path(base).is_absolute():
        base = str(p.parent / base)  # a file, named from this one's folder (else bundled)
    return {**load_preset(base, (*_seen, str(p.resolve()))), **d}


def load_config(path: str | Path) -> TrainConfig:
    """Reads a ``config.yaml`` written by a run."""
    return TrainConfig.from_dict(yaml.safe_load(Path(path).read_text()) or {})


BACKENDS = ("auto", "torch", "onnx", "float32")
"""What ``Predictor.on_backend`` (and ``--backend``) accepts; here, where the CLI can read it
without importing torch."""

BACKEND_HELP = (
    "auto runs PyTorch on a GPU or without onnxruntime, and on a CPU ONNX Runtime: the int8 "
    "model when one for these weights passed its accuracy gate (the one the checkpoint "
    "carries, as the bundled model does, or one `bcd export --int8` left in the cache), else "
    "the float32 export (made once into the cache and checked against PyTorch), else PyTorch "
    "when that export fails; a model without its checkpoint (an ONNX file) runs as it is.")
"""The ``auto`` policy of :func:`bcd.inference.select_backend` in one sentence, for every
door's help (``bcd predict/slide/serve --help``, :func:`bcd.app.create_app`)."""


def check_backend(backend: str) -> None:
    """Raises UserError unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise UserError(f"backend={backend!r}: use 'auto', 'torch', 'onnx' or 'float32'.")

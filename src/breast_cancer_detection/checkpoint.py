"""The checkpoint format: a typed record, atomic save, ``weights_only`` load, versions.

Every other module reads a checkpoint through :class:`Checkpoint`'s fields; only this module
knows the keys of the dict inside the ``.pt`` file. The devices and precisions a checkpoint
runs with (:func:`resolve_device`, :func:`amp_dtype`) live here too, so that loading a model
for inference needs nothing from the training loop.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .data.breakhis import CLASSES
from .errors import DISTRIBUTION, UserError
from .files import atomic_write, plain
from .models import why_unloadable

FORMAT = "bcd-checkpoint"
VERSION = 2
"""Written by this version of the package. 1: before the typed record (``best_metrics`` and
the resume state at the top level); still read."""
READABLE = (1, 2)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, damaged, of an unknown version, or holds more than plain
    data."""


# ----------------------------------------------------------------------------- devices


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error with advice."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"device {spec!r} is not a device: use auto, cpu, cuda or cuda:N.") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {spec!r} asked for, but PyTorch sees no CUDA GPU here. Use "
                        "--device cpu, or on Colab pick Runtime > Change runtime type > GPU.")
    return device


CPU_BF16_ENV = "BCD_CPU_BF16"
"""Overrides the bf16 check: ``0`` acts as a CPU without native bf16 (AVX2 only), ``1`` as one
with it (AVX512-BF16 or AMX; PyTorch emulates bf16 where the CPU lacks it, slowly but the same
code path). CI and the tests use it to run both CPU classes' defaults on whichever machine
they land on."""


def cpu_bf16_forced() -> bool | None:
    """What ``BCD_CPU_BF16`` says of native bf16, or None when it is unset.

    Raises:
        UserError: it is set to something other than ``0`` or ``1``.
    """
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if not forced:
        return None
    if forced not in ("0", "1"):
        raise UserError(f"{CPU_BF16_ENV}={forced!r}: use 1 (act as a CPU with native bf16), "
                        "0 (act as one without), or leave it unset to ask the CPU.")
    return forced == "1"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (oneDNN's own check), unless overridden.

    Raises:
        UserError: ``BCD_CPU_BF16`` is set to something other than ``0`` or ``1``.
    """
    forced = cpu_bf16_forced()
    if forced is not None:
        return forced
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this setting and device; None means full precision.

    On CUDA ``auto`` picks bf16 where the card has it, else fp16. On a CPU ``auto`` picks bf16
    only where the CPU computes it natively (AVX512-BF16 or AMX: convolutions train about twice
    as fast), and float32 elsewhere, where bf16 is emulated and about 10x slower; an explicit
    ``bf16`` is obeyed anyway, ``fp16`` stays float32.
    """
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if device.type == "cpu" and (amp == "bf16" or (amp == "auto" and cpu_has_native_bf16())):
        return torch.bfloat16
    return None


# ----------------------------------------------------------------------------- the record


@dataclass
class ResumeState:
    """What ``last.pt`` adds so a run continues exactly where it stopped."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    scaler: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    """Steps already done in the epoch after ``Checkpoint.epoch`` (0 at an epoch's end)."""
    model: dict[str, Any] | None = None
    """The trained weights when ``Checkpoint.state_dict`` holds their moving average."""
    partial: list[float] | None = None
    """Loss sum, correct and seen of the ``step`` steps done in the interrupted epoch."""


@dataclass
class Checkpoint:
    """A trained model and everything needed to use, evaluate or resume it.

    Attributes:
        arch: Architecture name for :func:`bcd.create_model`.
        state_dict: The weights (float32 on the CPU after :func:`load_checkpoint`).
        classes: Class names in output order.
        preprocessing: ``Preprocessing.to_dict()``: size, resize, mean, std.
        augment: ``Augmentation.to_dict()`` of the training run (for the record).
        config: ``TrainConfig.to_dict()`` of the run; empty when unknown.
        mpp: Micrometres per pixel of the images the model was trained on, when known.
        magnification: BreakHis magnifications trained on (e.g. ``["40X"]``); None for all.
        split_hash: Hash of the split the run used (:func:`bcd.data.splits.split_hash`).
        split_patients: Subset -> patient ids of that split (for the leakage check).
        threshold: P(malignant) at or above which an image is malignant, chosen on
            validation; None when none was chosen.
        threshold_info: How the threshold was chosen (method, subset, sensitivity...).
        metrics: Validation metrics of the best epoch (``val_auc``, ``val_acc``...).
        epoch: Epochs completed.
        best_epoch: The epoch these weights (``best.pt``) or the best so far (``last.pt``)
            come from.
        best_score: The selection score of ``best_epoch``.
        since_best: Epochs since ``best_epoch`` (early stopping).
        bad_images: Unreadable training images skipped so far (path -> reason).
        resume: Optimiser, scheduler and RNG state; only in ``last.pt``.
        versions: Library versions that wrote it.
        created: ISO time it was written.
        int8_onnx: An int8 ONNX Runtime model of these weights that passed its accuracy gate
            (``bcd export --int8 --embed``), carried in the file so that any CPU runs it
            without calibration data; None when there is none.
    """

    arch: str
    state_dict: dict[str, torch.Tensor]
    preprocessing: dict[str, Any]
    classes: list[str] = field(default_factory=lambda: list(CLASSES))
    augment: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    mpp: float | None = None
    magnification: list[str] | None = None
    split_hash: str | None = None
    split_patients: dict[str, list[str]] = field(default_factory=dict)
    threshold: float | None = None
    threshold_info: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    epoch: int = 0
    best_epoch: int = 0
    best_score: float = -math.inf
    since_best: int = 0
    bad_images: dict[str, str] = field(default_factory=dict)
    resume: ResumeState | None = None
    versions: dict[str, str] = field(default_factory=lambda: library_versions())
    created: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    int8_onnx: bytes | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def data(self) -> str | None:
        """The data folder the run trained on, when its config says."""
        return self.config.get("data") or None

    @property
    def group_by(self) -> str:
        """How the run's split grouped images: ``patient`` or ``slide``."""
        return self.config.get("group_by") or "patient"

    def pre(self):
        """The preprocessing as a :class:`bcd.data.transforms.Preprocessing`."""
        from .data.transforms import Preprocessing

        return Preprocessing.from_dict(self.preprocessing)

    def build_model(self) -> nn.Module:
        """The network with these weights, on the CPU, in eval mode."""
        from .models import create_model

        model = create_model(self.arch, num_classes=self.num_classes)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def with_threshold(self, value: float, info: dict[str, Any]) -> Checkpoint:
        """Sets the decision threshold and how it was chosen (numpy values made plain)."""
        self.threshold = float(value)
        self.threshold_info = plain({k: v for k, v in info.items() if k != "source"})
        return self

    def to_dict(self) -> dict[str, Any]:
        """The dict stored in the ``.pt`` file: tensors and plain Python values only."""
        d: dict[str, Any] = {
            "format": f"{FORMAT}/{VERSION}",
            "arch": self.arch, "num_classes": self.num_classes, "classes": list(self.classes),
            "model": {k: v.detach().cpu() for k, v in self.state_dict.items()},
            "preprocessing": plain(self.preprocessing), "augment": plain(self.augment),
            "config": plain(self.config),
            "scale": {"mpp": self.mpp, "magnification": self.magnification},
            "split_hash": self.split_hash, "split_patients": self.split_patients,
            "threshold": self.threshold, "threshold_info": plain(self.threshold_info),
            "metrics": plain(self.metrics),
            "epoch": self.epoch, "best_epoch": self.best_epoch,
            "best_score": float(self.best_score), "since_best": self.since_best,
            "bad_images": dict(self.bad_images),
            "versions": self.versions, "created": self.created,
        }
        if self.int8_onnx:
            d["int8_onnx"] = torch.frombuffer(bytearray(self.int8_onnx), dtype=torch.uint8)
        if self.resume is not None:
            r = self.resume
            d["resume"] = {"optimizer": r.optimizer, "scheduler": r.scheduler, "rng": r.rng,
                           "scaler": r.scaler, "step": r.step, "model": r.model,
                           "partial": r.partial}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "checkpoint") -> Checkpoint:
        """Reads a dict written by :meth:`to_dict`, of this format version or an older one.

        Raises:
            CheckpointError: not a bcd checkpoint, or a version this package cannot read.
        """
        version = _version(d, source)
        if version == 1:
            d = _upgrade_v1(d)
        try:
            scale = d.get("scale") or {}
            resume = d.get("resume")
            return cls(
                arch=d["arch"], state_dict=d["model"], preprocessing=d["preprocessing"],
                classes=list(d.get("classes") or CLASSES), augment=d.get("augment") or {},
                config=d.get("config") or {}, mpp=scale.get("mpp"),
                magnification=scale.get("magnification"), split_hash=d.get("split_hash"),
                split_patients=d.get("split_patients") or {}, threshold=d.get("threshold"),
                threshold_info=d.get("threshold_info") or {}, metrics=d.get("metrics") or {},
                epoch=int(d.get("epoch", 0)), best_epoch=int(d.get("best_epoch", 0)),
                best_score=float(d.get("best_score", -math.inf)),
                since_best=int(d.get("since_best", 0)),
                bad_images=dict(d.get("bad_images") or {}),
                resume=ResumeState(**resume) if resume else None,
                versions=d.get("versions") or {}, created=d.get("created") or "",
                int8_onnx=_bytes(d.get("int8_onnx")))
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{source}: a bcd checkpoint with a missing or malformed "
                                  f"field ({e}); re-train or re-download it.") from e


def _bytes(value: Any) -> bytes | None:
    """Bytes stored as a uint8 tensor (what a weights-only load reads safely), or None."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.numel():
        return value.contiguous().numpy().tobytes()
    return None


def _version(d: Any, source: str) -> int:
    tag = d.get("format") if isinstance(d, dict) else None
    name, _, number = str(tag).partition("/")
    if name != FORMAT or not number.isdigit():
        raise CheckpointError(f"{source}: not a bcd checkpoint (no '{FORMAT}/N' format tag).")
    if int(number) not in READABLE:
        raise CheckpointError(
            f"{source}: checkpoint format version {number}, but this bcd {__version__} reads "
            f"versions {', '.join(map(str, READABLE))}. Upgrade the package (pip install -U "
            f"{DISTRIBUTION}, or git pull in a clone) to load it.")
    return int(number)


def _upgrade_v1(d: dict[str, Any]) -> dict[str, Any]:
    """Version 1 kept the resume state at the top level and the metrics twice."""
    d = dict(d)
    d["metrics"] = d.get("best_metrics") or d.get("metrics") or {}
    if "optimizer" in d:
        d["resume"] = {"optimizer": d["optimizer"], "scheduler": d["scheduler"],
                       "rng": d["rng"], "scaler": d.get("scaler") or {}, "step": d.get("step", 0)}
    return d


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a checkpoint's numbers."""
    import numpy as np
    import torchvision

    return {"bcd": __version__, "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__),
            "python": platform.python_version(), "numpy": np.__version__}


# ----------------------------------------------------------------------------- files


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Writes a checkpoint atomically: a crash mid-save leaves the previous file intact.

    Raises:
        CheckpointError: the disk is full or not writable (one sentence, with the path).
    """
    data = ckpt.to_dict()
    try:
        return atomic_write(path, lambda f: torch.save(data, f))
    except OSError as e:
        raise CheckpointError(f"could not write {path} ({e.strerror or e}); free some disk "
                              "space or choose another --runs-dir, then resume.") from e


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Loads a checkpoint with ``weights_only=True``: plain data and tensors, no code.

    Raises:
        CheckpointError: missing file, damaged file, unknown format version, or one that
            holds pickled objects.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint. Train one with `bcd train`, or "
                              "download a released checkpoint.")
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(why_unloadable(path, e)) from e
    ckpt = Checkpoint.from_dict(raw, str(path))
    # Weights stored in half precision (to fit a release in a few MiB) run as float32.
    ckpt.state_dict = {k: (v.float() if v.is_floating_point() else v)
                       for k, v in ckpt.state_dict.items()}
    return ckpt


def untrained_checkpoint(arch: str, *, size: int = 224, resize: int | None = 256,
                         seed: int = 0) -> Checkpoint:
    """A randomly initialised model as a checkpoint, for benchmarks and serving smoke tests.

    It predicts nothing meaningful: its card says so through ``config`` being empty and no
    threshold or metrics.
    """
    from .data.transforms import Preprocessing
    from .models import create_model

    torch.manual_seed(seed)
    model = create_model(arch, num_classes=len(CLASSES))
    return Checkpoint(arch=arch, state_dict=model.state_dict(),
                      preprocessing=Preprocessing(size=size, resize=resize).to_dict())

"""Building a run from a :class:`~breast_cancer_detection.config.TrainConfig`: its data
(folder, split, datasets), its model, its optimisation (optimiser, schedule, loss, sampler
weights, gradient scaler), gathered in a :class:`Run`.

A run is built in phases by :func:`build_run`, for a new run or one resumed from its
``last.pt``.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..checkpoint import (
    CPU_BF16_ENV,
    Checkpoint,
    CheckpointError,
    amp_dtype,
    cpu_bf16_forced,
    cpu_has_native_bf16,
)
from ..config import TrainConfig
from ..data.breakhis import CLASSES, build_index
from ..data.datasets import ImageTableDataset, patient_balanced_weights
from ..data.splits import check_split, load_split, make_split, write_split
from ..errors import UserError
from ..models import create_model
from .processes import DistInfo, init_distributed, set_rng_state


@dataclass
class Optimisation:
    """How a run's weights are trained (built by :func:`build_optimisation`)."""

    optimizer: torch.optim.Optimizer
    """AdamW, weight decay on weights only (not on biases and norm scales)."""
    scheduler: torch.optim.lr_scheduler.LRScheduler
    """Linear warm-up, then a cosine to 0 (:class:`WarmupCosine`), stepped every batch."""
    scaler: Any
    """``torch.amp.GradScaler`` under float16 autocast, else None."""
    loss_fn: nn.Module
    """Cross-entropy, class-weighted with ``balance: loss``, with ``label_smoothing``."""
    sample_weights: torch.Tensor | None
    """Per-image sampling weights (``balance: sampler`` or ``patient``), else None."""
    steps_per_epoch: int
    """Batches per epoch on each rank."""
    drop_last: bool
    """Whether each epoch drops its last, incomplete batch (when a rank has more than one)."""


@dataclass
class Run:
    """Everything a run holds while it trains (built once by :func:`build_run`)."""

    cfg: TrainConfig
    """The run's settings; the time budget may replace them with fewer or more ``epochs``."""
    run_dir: Path
    """The run folder (``runs/NAME``)."""
    dist: DistInfo
    """This process's rank, the number of processes, and its device."""
    root: Path
    """The data folder (BreakHis downloaded into ``data/`` when ``cfg.data`` names none)."""
    split: pd.DataFrame
    """The image table with each image's subset (``split.csv``)."""
    pre: Any
    """Preprocessing (``size``, ``resize``), stored in every checkpoint."""
    aug: Any
    """Augmentation settings, stored in every checkpoint."""
    train_ds: Any
    """The training images: from the files, or from the prepared cache."""
    val_ds: Any
    """The validation images (none when the split holds no ``val``)."""
    batch_aug: nn.Module | None
    """Augmentation of whole batches on the device, or None when the workers augment."""
    batch_eval: nn.Module | None
    """Preprocessing of whole validation batches on the device, or None."""
    raw_model: nn.Module
    """The network itself, whose weights checkpoints store."""
    model: nn.Module
    """``raw_model`` wrapped for DDP and/or compiled: the one that trains."""
    dtype: torch.dtype | None
    """The autocast dtype (bfloat16 or float16), or None for float32."""
    opt: Optimisation
    """Optimiser, schedule, loss, sampler weights and gradient scaler."""
    progress: bool
    """Whether to show progress bars (on the main process)."""
    ema: Any = None
    """``torch.optim.swa_utils.AveragedModel`` of ``raw_model`` when ``cfg.ema`` is set."""
    started: float | None = None
    """``time.perf_counter()`` when ``fit`` began, for the time budget; None on resume."""
    final_s: float = 0.0
    """Predicted cost of the final pass (threshold, TTA), kept out of the time budget."""
    pace: dict[str, float] = field(default_factory=dict)
    """Predicted seconds of an epoch on ``whole`` images and on early ``window``s."""
    most_epochs: int = 0
    """The epochs the run was given, which the time budget never exceeds."""

    @property
    def eval_model(self) -> nn.Module:
        """What validation scores and checkpoints store: the averaged weights, or the raw."""
        return self.ema.module if self.ema is not None else self.raw_model

    @property
    def device(self) -> torch.device:
        """This process's device."""
        return self.dist.device

    @property
    def val_tab(self) -> pd.DataFrame:
        """The split's validation rows."""
        return self.split[self.split["split"] == "val"]

    def log(self, msg: str) -> None:
        """Prints ``msg`` on the main process, above any progress bar."""
        if self.dist.is_main:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stdout)


def _resolve_data(cfg: TrainConfig) -> Path:
    if cfg.data:
        return Path(cfg.data)
    from ..data.download import download_breakhis

    return download_breakhis("data")


def _resolve_split(cfg: TrainConfig, root: Path) -> pd.DataFrame:
    if cfg.split:
        split = load_split(cfg.split)
        if cfg.magnification:
            split = split[split["magnification"].isin(cfg.magnification)]
    else:
        index = build_index(root, group_by=cfg.group_by)
        split = make_split(index, val=cfg.val, test=cfg.test, seed=cfg.seed,
                           magnification=cfg.magnification)
    check_split(split)
    train = split[split["split"] == "train"]
    if train["target"].nunique() < 2:
        raise UserError(f"the training subset ({len(train)} images) does not hold both classes; "
                        "check the data folder and the split.")
    return split.reset_index(drop=True)


def new_run_dir(cfg: TrainConfig) -> Path:
    """The folder of a new run (``runs_dir/name``, by default named after the model and the
    time); refused when it already holds a run."""
    from datetime import datetime

    name = cfg.name or f"{cfg.model}-{datetime.now():%Y%m%d-%H%M%S}"
    run = Path(cfg.runs_dir) / name
    if (run / "last.pt").exists():
        raise UserError(f"{run} already holds a run. Resume it with `bcd train --resume {run}`, "
                        "or choose another --name.")
    return run


def _datasets(cfg: TrainConfig, root: Path, train_tab: pd.DataFrame, val_tab: pd.DataFrame,
              pre, aug, device: torch.device, log):
    """Train and val datasets, from the prepared cache when there is a fresh one.

    Returns:
        ``(train_ds, val_ds, batch_augment, batch_eval)``; the last two are device-side batch
        transforms when batch augmentation is on, else None.
    """
    from ..data.batch_augment import BatchAugment, BatchEval
    from ..data.transforms import build_eval_transform, build_train_transform

    train_tf, eval_tf = build_train_transform(pre=pre, aug=aug), build_eval_transform(pre=pre)
    cache, stale = None, None
    if cfg.cache != "off":
        from ..data.cache import check_cache, open_cache

        both = pd.concat([train_tab, val_tab])
        size = cfg.resize or cfg.size
        cache, stale = (check_cache(root, both, size) if cfg.cache == "auto"
                        else (open_cache(cfg.cache, root, both), None))
    on_batches = cfg.batch_augment == "on" or (
        cfg.batch_augment == "auto" and device.type == "cuda" and cache is not None)
    building = on_batches and cache is None and cfg.cache == "auto"
    if stale is not None and not building:
        from ..data.cache import StaleCacheWarning

        warnings.warn(f"not using the image cache: {stale}", StaleCacheWarning, stacklevel=3)
    if building:
        # The recipe reads whole batches from the cache: build it (once) rather than stop.
        from ..data.cache import find_cache, prepare_cache

        # The reason without its advice to run `bcd prepare`: that is what happens now.
        why = f" ({stale.split('; ')[0]})" if stale else ""
        log(f"Batch augmentation reads decoded images from a cache, and {root} has no fresh "
            f"one at {size} px{why}: building it now (once; `bcd prepare` does the same "
            "ahead).")
        prepare_cache(root, both, size, workers=min(2, os.cpu_count() or 1))
        cache = find_cache(root, both, size)
    if on_batches and cache is None:
        raise UserError(f"batch augmentation reads the prepared cache, and {root} has none at "
                        f"{cfg.resize or cfg.size} px: run `bcd prepare {root} --size "
                        f"{cfg.resize or cfg.size}` first, or pass --batch-augment off.")
    if cache is None:
        return (ImageTableDataset(root, train_tab, train_tf),
                ImageTableDataset(root, val_tab, eval_tf), None, None)
    from ..data.cache import CachedImageDataset

    log(f"Reading decoded images from the cache ({cache.shape[1]}x{cache.shape[2]} px)"
        + (", augmenting whole batches on " + str(device) if on_batches else ""))
    if not on_batches:
        return (CachedImageDataset(cache, train_tab, train_tf),
                CachedImageDataset(cache, val_tab, eval_tf), None, None)
    return (CachedImageDataset(cache, train_tab, as_uint8=True),
            CachedImageDataset(cache, val_tab, as_uint8=True),
            BatchAugment(pre=pre, aug=aug).to(device), BatchEval(pre=pre).to(device))


def build_model(cfg: TrainConfig, dist_info: DistInfo) -> tuple[nn.Module, nn.Module]:
    """``(raw_model, model)``: the network, and the same wrapped for DDP and/or compiled."""
    device = dist_info.device
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every retry
    raw_model = create_model(cfg.model, num_classes=len(CLASSES), pretrained=cfg.pretrained,
                             weights=cfg.weights, freeze_backbone=cfg.freeze_backbone,
                             freeze_early=cfg.freeze_early)
    raw_model.to(device)
    # channels_last also speeds up oneDNN convolutions on CPUs (~1.1-2x measured here).
    if cfg.channels_last:
        raw_model.to(memory_format=torch.channels_last)
    model = raw_model
    if dist_info.world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return raw_model, model


def set_schedule_end(opt: Optimisation, epochs: int) -> None:
    """Makes the cosine end after ``epochs`` epochs (a time budget or a resume moved it)."""
    opt.scheduler.lr_lambdas[0].total = epochs * opt.steps_per_epoch


class WarmupCosine:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then a cosine to 0 at
    ``total``. An object rather than a closure so that LambdaLR saves ``total`` with the
    checkpoint (a time budget may shorten the run)."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decay weights only: decaying biases and norm scales only hurts.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimisation(cfg: TrainConfig, raw_model: nn.Module, train_targets: np.ndarray,
                       n_train: int, dist_info: DistInfo,
                       dtype: torch.dtype | None,
                       train_patients: np.ndarray | None = None) -> Optimisation:
    """Optimiser, warm-up + cosine schedule, loss (class-weighted or not), sampler weights and
    the gradient scaler, sized for ``n_train`` images over ``cfg.epochs`` epochs
    (``train_patients`` for ``balance: patient``)."""
    device = dist_info.device
    counts = np.bincount(train_targets.astype(int), minlength=2)
    class_weights = None
    if cfg.balance == "loss":
        class_weights = torch.tensor(counts.sum() / (2.0 * counts), dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(
        weight=class_weights.to(device) if class_weights is not None else None,
        label_smoothing=cfg.label_smoothing)
    sample_weights = None
    if cfg.balance == "sampler":
        sample_weights = torch.tensor(1.0 / counts[train_targets.astype(int)])
    elif cfg.balance == "patient":
        if train_patients is None:
            train_patients = np.full(len(train_targets), "")
        sample_weights = torch.tensor(patient_balanced_weights(train_targets, train_patients))
    n_per_rank = math.ceil(n_train / dist_info.world)
    drop_last = n_per_rank > cfg.batch_size
    steps = (n_per_rank // cfg.batch_size if drop_last
             else math.ceil(n_per_rank / cfg.batch_size))
    optimizer = torch.optim.AdamW(_param_groups(raw_model, cfg.weight_decay), lr=cfg.lr)
    scheduler = _scheduler(optimizer, round(cfg.warmup_epochs * steps), cfg.epochs * steps)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return Optimisation(optimizer, scheduler, scaler, loss_fn, sample_weights, steps,
                        drop_last)


def build_run(cfg: TrainConfig, run_dir: Path, ckpt: Checkpoint | None,
              progress: bool) -> Run:
    """Data, model and optimisation of a new run, or of one resumed from ``ckpt``."""
    from ..data.transforms import Augmentation, Preprocessing

    dist_info = init_distributed(cfg)
    root = _resolve_data(cfg)
    if cfg.data is None:
        cfg.data = str(root)
    split = load_split(run_dir / "split.csv") if ckpt else _resolve_split(cfg, root)
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
        if not ckpt:
            write_split(split, run_dir / "split.csv")
    train_tab = split[split["split"] == "train"]
    pre = Preprocessing(size=cfg.size, resize=cfg.resize)
    aug = Augmentation.from_dict(cfg.augment)
    raw_model, model = build_model(cfg, dist_info)
    dtype = amp_dtype(cfg.amp, dist_info.device)
    run = Run(cfg, run_dir, dist_info, root, split, pre, aug, None, None, None, None,
              raw_model, model, dtype, None, progress)  # type: ignore[arg-type]
    run.train_ds, run.val_ds, run.batch_aug, run.batch_eval = _datasets(
        cfg, root, train_tab, run.val_tab, pre, aug, dist_info.device, run.log)
    run.opt = build_optimisation(cfg, raw_model, train_tab["target"].to_numpy(),
                                 len(run.train_ds), dist_info, dtype,
                                 train_tab["patient"].fillna("").astype(str).to_numpy()
                                 if "patient" in train_tab.columns else None)
    run.log(_precision_line(cfg.amp, dtype, dist_info.device))
    if cfg.ema is not None:
        run.ema = averaged(raw_model, cfg.ema)
    if ckpt is not None:
        if run.ema is not None:
            run.ema.module.load_state_dict(ckpt.state_dict)
            run.ema.n_averaged.fill_(1)  # not 0: that would restart the average from scratch
        raw_model.load_state_dict(ckpt.resume.model if ckpt.resume and ckpt.resume.model
                                  else ckpt.state_dict)
        if ckpt.resume is None:
            raise CheckpointError(f"{run_dir / 'last.pt'} holds no optimiser state (a best.pt "
                                  "copied over it?); it cannot be resumed.")
        run.opt.optimizer.load_state_dict(ckpt.resume.optimizer)
        run.opt.scheduler.load_state_dict(ckpt.resume.scheduler)
        # The saved schedule ends where the run was to end; --epochs on resume moves that end
        # (else the added epochs would train at a learning rate of 0).
        set_schedule_end(run.opt, cfg.epochs)
        if run.opt.scaler is not None and ckpt.resume.scaler:
            run.opt.scaler.load_state_dict(ckpt.resume.scaler)
        set_rng_state(ckpt.resume.rng)
    return run


def _precision_line(amp: str, dtype: torch.dtype | None, device: torch.device) -> str:
    name = str(dtype).removeprefix("torch.") if dtype else "float32"
    if device.type != "cpu":
        return f"Precision: {name} autocast on {device}." if dtype else "Precision: float32."
    native = cpu_has_native_bf16()
    forced = cpu_bf16_forced()
    told = ("" if forced is None else
            f"; {CPU_BF16_ENV}={int(forced)} decided this, not the CPU")
    if dtype is None:
        return ("Precision: float32" + ("" if native or amp == "off" else
                f" (this CPU has no native bf16, AVX512-BF16 or AMX, where bf16 would be "
                f"emulated and slower{told})") + ".")
    if native:
        return ("Precision: bf16 autocast (this CPU computes bf16 natively; --amp off for "
                f"float32{told}).")
    return ("Precision: bf16 autocast as asked, but this CPU has no native bf16 (AVX512-BF16 or "
            "AMX): it is emulated and several times slower than float32; pass --amp auto.")


def averaged(model: nn.Module, decay: float):
    """An exponential moving average of ``model``'s weights and BatchNorm statistics."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

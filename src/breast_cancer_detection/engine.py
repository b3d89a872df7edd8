"""The training loop: one epoch, the evaluation pass, a run (``fit``) and ``resume``.

One process, or torchrun with DistributedDataParallel. A run is built in phases (data,
model, optimisation), then trained epoch by epoch: train, validate, record. Its progress
lives in a :class:`RunState` that goes into every checkpoint and comes back out on resume.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .checkpoint import (
    CPU_BF16_ENV,
    Checkpoint,
    CheckpointError,
    ResumeState,
    amp_dtype,
    cpu_bf16_forced,
    cpu_has_native_bf16,
    load_checkpoint,
    resolve_device,
    save_checkpoint,
)
from .config import TrainConfig, load_config
from .data.batch_augment import random_windows
from .data.breakhis import CLASSES, build_index, layout_split
from .data.datasets import (
    EpochSampler,
    ImageTableDataset,
    collate_skip_bad,
    patient_balanced_weights,
    run_seed,
)
from .data.splits import check_split, load_split, make_split, split_hash, write_split
from .errors import UserError
from .files import plain, plural
from .metrics import accuracy, roc_auc
from .models import create_model


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (bad data, a diverged loss); the last good checkpoint is kept."""


class Terminated(KeyboardInterrupt):
    """SIGTERM during training: handled like Ctrl-C (``last.pt`` saved), exit code 143."""


# ----------------------------------------------------------------------------- processes


@dataclass
class DistInfo:
    """Where this process stands in a (possibly one-process) data-parallel run."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed(cfg: TrainConfig) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=resolve_device(cfg.device))
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), device=device)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 0, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


# ----------------------------------------------------------------------------- one epoch


@dataclass
class EpochState:
    """What the loop has done so far in the current epoch (read when it is interrupted)."""

    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0


def _report_bad(batch: dict, bad: dict[str, str], paths: list[str], log) -> None:
    for row, reason in batch["bad"]:
        p = paths[row]
        if p not in bad:
            bad[p] = reason
            log(f"warning: skipping unreadable image {p}: {reason}")


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, loss_fn, device: torch.device,
                    *, dtype: torch.dtype | None = None, scaler=None, channels_last: bool = False,
                    state: EpochState | None = None, bad: dict[str, str] | None = None,
                    paths: list[str] | None = None, log_every: int = 10, progress=None,
                    log=print, batch_transform: nn.Module | None = None,
                    aug_seed: int = 0, ema=None, window: int | None = None,
                    mixup: float = 0.0) -> EpochState:
    """Trains over ``loader`` once.

    Args:
        state: Updated in place after every step, so a caller that catches an interrupt knows
            how far the epoch got.
        bad: Unreadable images seen so far (path -> reason), added to in place.
        progress: A tqdm bar to advance, or None.
        batch_transform: Augmentation applied to whole uint8 batches on the device (e.g.
            :class:`bcd.data.transforms.BatchAugment`); None when the loader already did it.
        aug_seed: With ``batch_transform`` or ``window``, batch k is augmented with seed
            ``aug_seed + k`` (k counted from the start of the epoch, so a resumed epoch draws
            the same).
        window: Train on a random ``window``-px part of each image, at its own scale
            (``TrainConfig.early_crop``); cut before ``batch_transform`` augments it.
        mixup: Beta concentration of mixup (``TrainConfig.mixup``); 0 is off. Batch k is
            mixed by :func:`mixup_draw` with seed ``aug_seed + k``.

    Raises:
        TrainingError: the loss became NaN or infinite.
    """
    state = state or EpochState()
    bad = {} if bad is None else bad
    model.train()
    running = torch.zeros(2, device=device)  # loss sum, correct count; read only at log points
    try:
        for batch in loader:
            _check_stop()
            if batch["bad"]:
                _report_bad(batch, bad, paths or [], log)
            if batch["x"] is None:
                continue
            x = batch["x"].to(device, non_blocking=True)
            y = batch["y"].to(device, non_blocking=True)
            if batch_transform is not None or window is not None:
                g = torch.Generator(device=device).manual_seed(aug_seed + state.step)
                if batch_transform is not None:
                    x = batch_transform(x, generator=g, window=window)
                else:  # already augmented whole in the workers
                    x = random_windows(x, window, generator=g)
            if mixup > 0:
                lam, perm = mixup_draw(len(y), mixup, aug_seed + state.step, device)
                x = torch.lerp(x[perm], x, lam)  # lam * x + (1 - lam) * x[perm]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(x)
                loss = loss_fn(logits.float(), y)
                if mixup > 0:
                    loss = lam * loss + (1 - lam) * loss_fn(logits.float(), y[perm])
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            running += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum().float()])
            state.step += 1
            state.seen += len(y)
            if state.step % log_every == 0:
                _sync_running(state, running)
                if progress is not None:
                    progress.set_postfix(loss=f"{state.loss_sum / state.seen:.4f}",
                                         acc=f"{state.correct / state.seen:.3f}")
            if progress is not None:
                progress.update(1)
    except KeyboardInterrupt:
        _sync_running(state, running)  # so the saved epoch keeps what its steps scored
        raise
    _sync_running(state, running)
    return state


def mixup_draw(n: int, alpha: float, seed: int, device: torch.device | str = "cpu"
               ) -> tuple[float, torch.Tensor]:
    """The mixup weight (from Beta(alpha, alpha), kept >= 0.5 so that each image's own label
    leads) and the partner of each of the ``n`` images, the same for the same seed (a resumed
    epoch mixes as the interrupted one did)."""
    rng = np.random.default_rng([seed, 0x6D6978])
    lam = float(rng.beta(alpha, alpha))
    return max(lam, 1.0 - lam), torch.from_numpy(rng.permutation(n)).to(device)


def _sync_running(state: EpochState, running: torch.Tensor) -> None:
    loss_sum, correct = running.tolist()
    running.zero_()
    if not math.isfinite(loss_sum):
        raise TrainingError(f"the loss became {loss_sum} at step {state.step}: training "
                            "diverged. Lower --lr, try --amp off, or check the images.")
    state.loss_sum += loss_sum
    state.correct += int(correct)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, dtype: torch.dtype | None = None,
             channels_last: bool = False, loss_fn=None, progress=None,
             batch_transform: nn.Module | None = None, tta: bool = False
             ) -> dict[str, np.ndarray]:
    """Runs the model over ``loader`` without gradients.

    Args:
        tta: Average the probabilities over the 8 flips/rotations of each image (tissue has
            no up or left, so all 8 are equally valid views).

    Returns:
        ``prob`` (P(malignant) per image), ``target``, ``row`` (the table row of each image),
        and ``loss`` (mean, when ``loss_fn`` is given).
    """
    from .data.transforms import view_mean

    model.eval()
    probs, targets, rows, loss_sum = [], [], [], 0.0
    for batch in loader:
        _check_stop()
        if batch["x"] is None:
            continue
        x = batch["x"].to(device, non_blocking=True)
        if batch_transform is not None:
            x = batch_transform(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            if tta:
                p = view_mean(lambda v: torch.softmax(model(v).float(), 1), x)
                logits = torch.log(p.clamp_min(1e-12))
            else:
                logits = model(x).float()
        if loss_fn is not None:
            loss_sum += float(loss_fn(logits, batch["y"].to(device))) * len(batch["y"])
        probs.append(torch.softmax(logits, 1)[:, 1].cpu())
        targets.append(batch["y"])
        rows.append(batch["rows"])
        if progress is not None:
            progress.update(1)
    cat = (lambda t: torch.cat(t).numpy()) if probs else (lambda t: np.zeros(0))
    out = {"prob": cat(probs), "target": cat(targets), "row": cat(rows)}
    out["loss"] = loss_sum / max(1, len(out["target"]))
    return out


# ----------------------------------------------------------------------------- run state


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    best_epoch: int
    best: dict[str, float]
    last: dict[str, float]
    bad_images: dict[str, str]
    stopped_early: bool = False


@dataclass
class RunState:
    """How far a run has got: stored in every checkpoint, read back on resume."""

    epoch: int = 0
    """Epochs completed."""
    step: int = 0
    """Steps done in the epoch after ``epoch`` (non-zero only after an interruption)."""
    best_score: float = -math.inf
    best_epoch: int = 0
    since_best: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    bad_images: dict[str, str] = field(default_factory=dict)
    partial: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """Loss sum, correct and seen of the steps done in an interrupted epoch, so that its row
    in metrics.csv covers the whole epoch after a resume."""

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> RunState:
        partial = ckpt.resume.partial if ckpt.resume and ckpt.resume.partial else None
        return cls(epoch=ckpt.epoch, step=ckpt.resume.step if ckpt.resume else 0,
                   partial=list(partial or [0.0, 0.0, 0.0]),
                   best_score=ckpt.best_score, best_epoch=ckpt.best_epoch,
                   since_best=ckpt.since_best, best_metrics=dict(ckpt.metrics),
                   bad_images=dict(ckpt.bad_images))

    def to_checkpoint(self, run: _Run, *, full: bool) -> Checkpoint:
        """The run's checkpoint now; ``full`` adds what resuming needs (``last.pt``)."""
        cfg, split = run.cfg, run.split
        resume_state = None
        if full:
            o = run.opt
            resume_state = ResumeState(
                optimizer=o.optimizer.state_dict(), scheduler=o.scheduler.state_dict(),
                scaler=o.scaler.state_dict() if o.scaler is not None else {},
                rng=_rng_state(), step=self.step, partial=list(self.partial),
                model=run.raw_model.state_dict() if run.ema is not None else None)
        return Checkpoint(
            arch=cfg.model, state_dict=run.eval_model.state_dict(), classes=list(CLASSES),
            preprocessing=run.pre.to_dict(), augment=run.aug.to_dict(), config=cfg.to_dict(),
            mpp=cfg.mpp, magnification=cfg.magnification, split_hash=split_hash(split),
            split_patients={s: sorted(set(g["patient"]) - {""})
                            for s, g in split.groupby("split")},
            metrics=dict(self.best_metrics), epoch=self.epoch, best_epoch=self.best_epoch,
            best_score=self.best_score, since_best=self.since_best,
            bad_images=dict(self.bad_images), resume=resume_state)


@dataclass
class _Optimisation:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: Any
    loss_fn: nn.Module
    sample_weights: torch.Tensor | None
    steps_per_epoch: int
    drop_last: bool


@dataclass
class _Run:
    """Everything a run holds while it trains (built once by :func:`_build_run`)."""

    cfg: TrainConfig
    run_dir: Path
    dist: DistInfo
    root: Path
    split: pd.DataFrame
    pre: Any
    aug: Any
    train_ds: Any
    val_ds: Any
    batch_aug: nn.Module | None
    batch_eval: nn.Module | None
    raw_model: nn.Module
    model: nn.Module
    dtype: torch.dtype | None
    opt: _Optimisation
    progress: bool
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
        return self.dist.device

    @property
    def val_tab(self) -> pd.DataFrame:
        return self.split[self.split["split"] == "val"]

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stdout)


# ----------------------------------------------------------------------------- building a run


def _resolve_data(cfg: TrainConfig) -> Path:
    if cfg.data:
        return Path(cfg.data)
    from .data.download import download_breakhis

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


def _new_run_dir(cfg: TrainConfig) -> Path:
    from datetime import datetime

    name = cfg.name or f"{cfg.model}-{datetime.now():%Y%m%d-%H%M%S}"
    run = Path(cfg.runs_dir) / name
    if (run / "last.pt").exists():
        raise UserError(f"{run} already holds a run. Resume it with `bcd train --resume {run}`, "
                        "or choose another --name.")
    return run


def _ignore_sigterm(worker_id: int) -> None:
    # `timeout`, SLURM and systemd signal the whole process group. A worker that dies of it
    # makes the main process fail inside backward with "DataLoader worker killed"; ignoring it
    # here leaves the shutdown to the main process, which saves last.pt and stops the workers.
    # The worker starts with SIGTERM blocked (_Loader.__iter__): one that arrived since the
    # fork is pending, and ignoring it discards it before it is unblocked.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    # A worker that ignores SIGTERM also ignores the main process's terminate() at shutdown:
    # one blocked writing a batch nobody reads would outlive it, holding its pipes open. On
    # Linux the kernel kills it when the main process is gone.
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


@contextlib.contextmanager
def _sigterm_blocked():
    """SIGTERM held back (not lost) in this thread, and in processes it forks, until exit."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks, no fork
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


def _kill_workers_at_exit() -> None:
    # At exit, multiprocessing terminate()s the workers still running and waits for them; ours
    # ignore SIGTERM, so a run that ended on an exception (its iterator kept alive by the
    # traceback) would wait forever. Registered after multiprocessing's own exit hook, so it
    # runs first.
    for it in list(_LIVE_ITERATORS):
        for w in getattr(it, "_workers", ()):
            if w.is_alive():
                w.kill()


class _Loader(torch.utils.data.DataLoader):
    """A DataLoader whose workers survive a SIGTERM to the process group (see above)."""

    def __iter__(self):
        # Workers start with SIGTERM blocked, so one that arrives between the fork and
        # _ignore_sigterm cannot kill them; the main process gets it when the workers are up.
        with _sigterm_blocked():
            it = super().__iter__()
        if self.num_workers > 0:
            _LIVE_ITERATORS.add(it)
        return it


atexit.register(_kill_workers_at_exit)


def _loader(ds, sampler, cfg: TrainConfig, device: torch.device, *, seed: int, drop_last: bool):
    kw: dict[str, Any] = {}
    # More workers than cores only adds switching (and a warning from PyTorch).
    workers = min(cfg.workers, os.cpu_count() or 1)
    if workers > 0:
        kw.update(prefetch_factor=4 if device.type == "cuda" else 2,
                  worker_init_fn=_ignore_sigterm)
    return _Loader(
        ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
        collate_fn=collate_skip_bad, pin_memory=device.type == "cuda", drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed), **kw)


def _datasets(cfg: TrainConfig, root: Path, train_tab: pd.DataFrame, val_tab: pd.DataFrame,
              pre, aug, device: torch.device, log):
    """Train and val datasets, from the prepared cache when there is a fresh one.

    Returns:
        ``(train_ds, val_ds, batch_augment, batch_eval)``; the last two are device-side batch
        transforms when batch augmentation is on, else None.
    """
    from .data.batch_augment import BatchAugment, BatchEval
    from .data.transforms import build_eval_transform, build_train_transform

    train_tf, eval_tf = build_train_transform(pre=pre, aug=aug), build_eval_transform(pre=pre)
    cache, stale = None, None
    if cfg.cache != "off":
        from .data.cache import check_cache, open_cache

        both = pd.concat([train_tab, val_tab])
        size = cfg.resize or cfg.size
        cache, stale = (check_cache(root, both, size) if cfg.cache == "auto"
                        else (open_cache(cfg.cache, root, both), None))
    on_batches = cfg.batch_augment == "on" or (
        cfg.batch_augment == "auto" and device.type == "cuda" and cache is not None)
    building = on_batches and cache is None and cfg.cache == "auto"
    if stale is not None and not building:
        from .data.cache import StaleCacheWarning

        warnings.warn(f"not using the image cache: {stale}", StaleCacheWarning, stacklevel=3)
    if building:
        # The recipe reads whole batches from the cache: build it (once) rather than stop.
        from .data.cache import find_cache, prepare_cache

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
    from .data.cache import CachedImageDataset

    log(f"Reading decoded images from the cache ({cache.shape[1]}x{cache.shape[2]} px)"
        + (", augmenting whole batches on " + str(device) if on_batches else ""))
    if not on_batches:
        return (CachedImageDataset(cache, train_tab, train_tf),
                CachedImageDataset(cache, val_tab, eval_tf), None, None)
    return (CachedImageDataset(cache, train_tab, as_uint8=True),
            CachedImageDataset(cache, val_tab, as_uint8=True),
            BatchAugment(pre=pre, aug=aug).to(device), BatchEval(pre=pre).to(device))


def _build_model(cfg: TrainConfig, dist_info: DistInfo) -> tuple[nn.Module, nn.Module]:
    """``(raw_model, model)``: the network, and the same wrapped for DDP and/or compiled."""
    device = dist_info.device
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every retry
    raw_model = create_model(cfg.model, num_classes=len(CLASSES), pretrained=cfg.pretrained,
                             weights=cfg.weights, freeze_backbone=cfg.freeze_backbone)
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


def _set_schedule_end(opt: _Optimisation, epochs: int) -> None:
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
                       train_patients: np.ndarray | None = None) -> _Optimisation:
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
    return _Optimisation(optimizer, scheduler, scaler, loss_fn, sample_weights, steps,
                         drop_last)


def _build_run(cfg: TrainConfig, run_dir: Path, ckpt: Checkpoint | None,
               progress: bool) -> _Run:
    """Data, model and optimisation of a new run, or of one resumed from ``ckpt``."""
    from .data.transforms import Augmentation, Preprocessing

    dist_info = _init_distributed(cfg)
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
    raw_model, model = _build_model(cfg, dist_info)
    dtype = amp_dtype(cfg.amp, dist_info.device)
    run = _Run(cfg, run_dir, dist_info, root, split, pre, aug, None, None, None, None,
               raw_model, model, dtype, None, progress)  # type: ignore[arg-type]
    run.train_ds, run.val_ds, run.batch_aug, run.batch_eval = _datasets(
        cfg, root, train_tab, run.val_tab, pre, aug, dist_info.device, run.log)
    run.opt = build_optimisation(cfg, raw_model, train_tab["target"].to_numpy(),
                                 len(run.train_ds), dist_info, dtype,
                                 train_tab["patient"].fillna("").astype(str).to_numpy()
                                 if "patient" in train_tab.columns else None)
    run.log(_precision_line(cfg.amp, dtype, dist_info.device))
    if cfg.ema is not None:
        run.ema = _averaged(raw_model, cfg.ema)
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
        _set_schedule_end(run.opt, cfg.epochs)
        if run.opt.scaler is not None and ckpt.resume.scaler:
            run.opt.scaler.load_state_dict(ckpt.resume.scaler)
        _set_rng_state(ckpt.resume.rng)
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


# ----------------------------------------------------------------------------- time budget


def _time_steps(run: _Run, steps: int, *, tta: bool = False, compiled: bool = False,
                val_images: int | None = None, window: int | None = None,
                validate: bool = True) -> tuple[float, float]:
    """Seconds per training step and per validation pass, timed on a throwaway copy.

    The copy trains (``train_one_epoch``, weight averaging included when the run has it) on
    the first batches of epoch 1, so the run's weights and optimiser are untouched, and
    torch's CPU generator is restored (every epoch reseeds from the run seed anyway). One
    warm-up step (allocation, kernel choice) is not counted; loading is. Validation is timed
    on ``val_images`` (default 4 batches) and scaled to the whole subset.

    Args:
        tta: Time an 8-view validation.
        compiled: Time the copy under ``torch.compile``.
        window: Time steps on ``window``-px windows (``TrainConfig.early_crop``).
        validate: False skips the validation timing (returned as 0).
    """
    import copy

    cfg = run.cfg
    rng = torch.get_rng_state()
    model = copy.deepcopy(run.raw_model)
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    constant = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    ema = _averaged(model, cfg.ema) if cfg.ema is not None else None
    order = EpochSampler(len(run.train_ds), seed=cfg.seed, epoch=0, world=1).indices

    def train(first: int, n: int) -> EpochState:
        sampler = EpochSampler(0, seed=0, epoch=0)
        sampler.indices = order[first * cfg.batch_size:(first + n) * cfg.batch_size]
        loader = _loader(run.train_ds, sampler, cfg, run.device, seed=0, drop_last=False)
        return train_one_epoch(forward, loader, opt, constant, run.opt.loss_fn, run.device,
                               dtype=run.dtype, channels_last=cfg.channels_last,
                               log_every=10**9, log=lambda msg: None,
                               batch_transform=run.batch_aug, ema=ema, window=window,
                               mixup=cfg.mixup)

    train(0, 1)
    t0 = time.perf_counter()
    done = train(1, steps).step or train(0, 1).step  # data smaller than two batches
    step_s = (time.perf_counter() - t0) / max(1, done)
    if not done:
        raise UserError(f"no readable training image to time the first steps with under "
                        f"{run.root}; check the data folder.")
    val_s = 0.0
    if validate and len(run.val_ds):
        n = min(len(run.val_ds), val_images or 4 * cfg.batch_size)
        vs = EpochSampler(len(run.val_ds), seed=0, epoch=0, shuffle=False)
        vs.indices = vs.indices[:n]
        t0 = time.perf_counter()
        evaluate(forward, _loader(run.val_ds, vs, cfg, run.device, seed=0, drop_last=False),
                 run.device, dtype=run.dtype, channels_last=cfg.channels_last,
                 batch_transform=run.batch_eval, tta=tta)
        val_s = (time.perf_counter() - t0) * len(run.val_ds) / n
    torch.set_rng_state(rng)
    return step_s, val_s


def _averaged(model: nn.Module, decay: float):
    """An exponential moving average of ``model``'s weights and BatchNorm statistics."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _epoch_costs(cfg: TrainConfig, epochs: int, pace: dict[str, float],
                 early: int | None = None) -> list[float]:
    """Predicted seconds of each of ``epochs`` epochs under ``cfg``'s early windows.

    ``pace`` holds ``whole`` and ``window`` (seconds of an epoch on whole images, and on
    ``early_crop`` windows, validation included). ``early`` fixes how many epochs are
    windowed (once they have run); by default it follows ``early_fraction`` of ``epochs``."""
    if early is None:
        early = TrainConfig.from_dict({**cfg.to_dict(), "epochs": epochs}).early_epochs
    return [pace["window"] if e < early else pace["whole"] for e in range(epochs)]


def _fitting_epochs(cfg: TrainConfig, done: int, most: int, left: float,
                    pace: dict[str, float], early: int | None = None) -> int:
    """The most epochs (``done`` to ``most``) whose epochs after ``done`` cost <= ``left``."""
    best = done
    for epochs in range(done + 1, most + 1):
        if sum(_epoch_costs(cfg, epochs, pace, early)[done:]) <= left:
            best = epochs
    return best


def _plan_epochs(run: _Run, started: float) -> None:
    """Sizes the run to ``time_budget``, or warns when a GPU recipe runs on a CPU."""
    cfg = run.cfg
    on_cpu_gpu_recipe = cfg.expects_gpu and run.device.type != "cuda"
    if not (cfg.time_budget or on_cpu_gpu_recipe):
        return
    from .config import parse_duration

    step_s, val_s = _time_steps(run, steps=12)
    steps = run.opt.steps_per_epoch
    # The final pass (threshold, and 8 views with tta) costs about one validation, or nine.
    final_s = val_s * (9 if cfg.tta else 1)
    per_epoch = steps * step_s + val_s
    if on_cpu_gpu_recipe:
        whole = cfg.epochs * per_epoch + final_s
        took = f"{whole / 3600:.1f} h" if whole >= 3600 else f"{whole / 60:.0f} min"
        run.log(f"WARNING: this recipe expects a CUDA GPU and there is none: on {run.device} "
                f"the first steps take {step_s:.2f} s each, so {cfg.epochs} epoch(s) would take "
                f"about {took}. Pass --time-budget 30m to fit the run to the time you have, or "
                "use the CPU recipe (--preset pcam-cpu on PCam-sized patches).")
    if not cfg.time_budget:
        return
    pace = {"whole": per_epoch, "window": per_epoch}
    window_note = ""
    if cfg.early_crop:
        window_s, _ = _time_steps(run, steps=12, window=cfg.early_crop, validate=False)
        pace["window"] = steps * window_s + val_s
        window_note = f" ({window_s:.2f} s on {cfg.early_crop} px windows)"
    budget = parse_duration(cfg.time_budget)
    run.started, run.final_s, run.pace, run.most_epochs = started, final_s, pace, cfg.epochs
    # 5% kept back: a run's later steps are a little slower than the timed ones (progress
    # bars, checkpoint writes, a busier page cache); _replan corrects the rest.
    left = 0.95 * budget - (time.perf_counter() - started) - final_s
    epochs = max(1, _fitting_epochs(cfg, 0, cfg.epochs, left, pace))
    epochs = int(max(_gather(epochs, run.dist)))  # every rank runs the same schedule
    _set_epochs(run, epochs)
    early = run.cfg.early_epochs
    run.log(f"Time budget {cfg.time_budget}: {steps} steps x {step_s:.2f} s{window_note} + "
            f"{val_s:.0f} s validation per epoch -> {epochs} epoch(s) (at most {cfg.epochs})"
            + (f", the first {early} on {cfg.early_crop} px windows" if early else "") + ".")


def _set_epochs(run: _Run, epochs: int, early: int | None = None) -> None:
    """Moves the run's end (and the cosine's) to ``epochs``, saved in ``config.yaml``.

    ``early`` keeps that many epochs on ``early_crop`` windows (those already trained), by
    setting ``early_fraction`` to ``early / epochs``; by default the share stays."""
    if epochs == run.cfg.epochs:
        return
    changes: dict[str, Any] = {"epochs": epochs}
    if early is not None and run.cfg.early_crop:
        changes["early_fraction"] = early / epochs
    run.cfg = TrainConfig.from_dict({**run.cfg.to_dict(), **changes})
    _set_schedule_end(run.opt, epochs)
    if run.dist.is_main:
        run.cfg.save(run.run_dir / "config.yaml")


# ----------------------------------------------------------------------------- the run


def fit(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Trains a new model as ``cfg`` says and writes the run folder.

    ``runs/NAME/`` receives ``config.yaml``, ``split.csv``, ``metrics.csv``, ``last.pt`` (every
    epoch, and on Ctrl-C or SIGTERM) and ``best.pt`` (best validation AUC).

    Raises:
        TrainingError: too many unreadable images, or a diverged loss.
        KeyboardInterrupt: after saving ``last.pt`` and printing how to resume.
    """
    started = time.perf_counter()
    run_dir = _new_run_dir(cfg)
    fresh = not run_dir.exists()
    try:
        run = _build_run(cfg, run_dir, None, progress)
        _plan_epochs(run, started)
    except BaseException:
        if fresh:  # a run that failed before its first epoch leaves no folder to mistake for one
            _remove_unstarted(run_dir)
        raise
    return _train(run, RunState())


def _remove_unstarted(run_dir: Path) -> None:
    """Removes what a new run wrote before its first epoch (its settings and split), and
    the folder when nothing else is in it."""
    for name in ("config.yaml", "split.csv"):
        (run_dir / name).unlink(missing_ok=True)
    try:
        run_dir.rmdir()
    except OSError:  # missing, or holds something else: leave it
        pass


def _run_folder(path: str | Path) -> Path:
    """The run folder ``--resume`` names: the folder itself, or the folder of a ``last.pt`` /
    ``best.pt`` given instead.

    Raises:
        UserError: no such folder, or one that ``bcd train`` did not make.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".pt":
        path = path.parent
    if not path.is_dir():
        raise UserError(f"{path}: no such run folder. Resume a folder that `bcd train` made, "
                        "e.g. `bcd train --resume runs/NAME`.")
    if not (path / "config.yaml").is_file():
        raise UserError(f"{path} is not a run folder (it has no config.yaml): resume the folder "
                        "that `bcd train` made, e.g. `bcd train --resume runs/NAME`.")
    return path


def resume(run_dir: str | Path, overrides: dict[str, Any] | None = None, *,
           progress: bool = True) -> TrainResult:
    """Continues a run from its ``last.pt``, with its own ``config.yaml``.

    Args:
        run_dir: The run folder.
        overrides: Settings to change, e.g. ``{"epochs": 30}`` to train on.

    Raises:
        UserError: the run has already trained ``epochs`` epochs.
    """
    run_dir = _run_folder(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if overrides:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), **overrides})
    ckpt = load_checkpoint(run_dir / "last.pt")
    if ckpt.epoch >= cfg.epochs:
        raise UserError(f"{run_dir} already trained {plural(ckpt.epoch, 'epoch')}; pass a "
                        "larger --epochs to train on.")
    run = _build_run(cfg, run_dir, ckpt, progress)
    state = RunState.from_checkpoint(ckpt)
    run.log(f"Resuming {run_dir} at epoch {state.epoch + 1}"
            + (f", step {state.step}" if state.step else ""))
    return _train(run, state)


def _train(run: _Run, state: RunState) -> TrainResult:
    """Trains from ``state`` to ``cfg.epochs``; saves ``last.pt`` on an interrupt."""
    cfg = run.cfg
    metrics_path = run.run_dir / "metrics.csv"
    history = pd.read_csv(metrics_path) if state.epoch and metrics_path.exists() else (
        pd.DataFrame())
    if len(history):
        # Rows written after the checkpoint (a crash between the two writes) are redone.
        history = history[history["epoch"] <= state.epoch]
    tb = _tensorboard(run)
    run.log(f"Run folder {run.run_dir}: {len(run.train_ds)} train / {len(run.val_ds)} val "
            f"images, {cfg.model} on {run.device}"
            + (f" x{run.dist.world}" if run.dist.world > 1 else "")
            + (f", {str(run.dtype).removeprefix('torch.')} autocast" if run.dtype else ""))
    last_row: dict[str, float] = {}
    stopped_early = False
    with _sigterm_as_interrupt():
        try:
            while state.epoch < run.cfg.epochs:
                row = _train_epoch(run, state)
                _replan(run, history, row)  # before the checkpoints, which carry the schedule
                improved = _record_epoch(run, state, row, tb)
                history = pd.concat([history, pd.DataFrame([row])], ignore_index=True)
                if run.dist.is_main:
                    history.to_csv(metrics_path, index=False)
                last_row = row
                run.log(_epoch_line(row, run.cfg.epochs, improved, run.cfg.size))
                _check_stop()  # a SIGTERM during the bookkeeping above
                if cfg.early_stop and state.since_best >= cfg.early_stop:
                    run.log(f"Early stop: no better validation AUC for {state.since_best} "
                            "epochs.")
                    stopped_early = True
                    break
        except KeyboardInterrupt:
            if run.dist.is_main:
                # Completed steps of this epoch are kept; resuming continues with the next batch.
                save_checkpoint(state.to_checkpoint(run, full=True), run.run_dir / "last.pt")
                print(f"\nInterrupted at epoch {state.epoch + 1}, step {state.step}. Saved "
                      f"{run.run_dir / 'last.pt'}. Resume with: bcd train --resume "
                      f"{run.run_dir}", file=sys.stderr)
            raise
        finally:
            if tb is not None:
                tb.close()
    bad = state.bad_images
    if bad:
        run.log(f"{len(bad)} unreadable training image(s) were skipped: "
                + ", ".join(list(bad)[:5]) + (" ..." if len(bad) > 5 else ""))
    if run.dist.is_main and not (run.run_dir / "best.pt").exists():
        save_checkpoint(state.to_checkpoint(run, full=False), run.run_dir / "best.pt")
    if run.dist.is_main and len(run.val_ds):
        state.best_metrics = _finish_best(run)
    result = TrainResult(run.run_dir, state.best_epoch, state.best_metrics, last_row, bad,
                         stopped_early)
    run.log(_closing_line(result, run.val_tab, run.cfg))
    if run.dist.world > 1:
        _end_distributed()
    return result


def _end_distributed() -> None:
    """Ends the torchrun process group once every rank has finished (rank 0 goes on alone to
    choose the threshold): a rank that exits while another still holds the group can abort in
    gloo's teardown (SIGABRT, "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _replan(run: _Run, history: pd.DataFrame, row: dict) -> None:
    """Re-sizes the schedule to the measured pace of the epochs so far.

    After each epoch from the second on, the epochs still to run are costed from the first
    steps' timing, scaled by how the recent epochs of the same kind (windowed or whole)
    measured against it. When fewer fit than planned, the cosine's end moves closer (the
    learning rate steps down a little) so that the run still ends inside ``time_budget``
    (the first epoch's timing includes once-only costs; a run that really is slower is
    corrected after its second epoch). When more fit, it moves later, never past the
    ``epochs`` the run was given, and only where the learning rate is still near its top: in
    the run's first half while it trains on ``early_crop`` windows, and after the first one
    or two whole-image epochs (the first measure of their pace: a slow first timing would
    otherwise leave minutes of the budget unused); there the added epochs are whole ones and
    the windowed ones stay as trained.
    """
    cfg, done = run.cfg, int(row["epoch"])
    if run.started is None or not cfg.time_budget or done >= cfg.epochs:
        return
    from .config import parse_duration

    # The first epoch pays once-only costs (workers starting, the cache's first reads) that
    # would make the plan shrink for nothing: its pace is not used.
    rows = [r for r in [*history.to_dict("records"), row] if int(r["epoch"]) > 1]
    if not rows:
        return
    factors = {}
    for kind in ("window", "whole"):
        recent = [r for r in rows if _epoch_kind(cfg, r) == kind][-3:]
        if recent:
            factors[kind] = float(np.mean([r["seconds"] / run.pace[kind] for r in recent]))
    factor = factors[_epoch_kind(cfg, row)]
    pace = {k: v * factors.get(k, factor) for k, v in run.pace.items()}
    left = 0.95 * parse_duration(cfg.time_budget) - (time.perf_counter() - run.started) - (
        run.final_s)
    # Past the windows, their number is fixed: what changes is how many whole epochs follow.
    early = cfg.early_epochs if cfg.early_crop and done >= cfg.early_epochs else None
    # No time for another epoch: stop here (the cosine ends unfinished) rather than overrun.
    epochs = _fitting_epochs(cfg, done, cfg.epochs, left, pace, early)
    windowed_first_half = done < cfg.epochs / 2 and (
        not cfg.early_crop or done < cfg.early_epochs)
    first_whole = bool(cfg.early_crop) and 1 <= done - cfg.early_epochs <= 2
    if epochs == cfg.epochs and (windowed_first_half or first_whole):
        # Grown only with half an epoch to spare, so that a plan on the edge does not flip
        # back and forth between two lengths.
        epochs = max(epochs, _fitting_epochs(cfg, done, run.most_epochs,
                                             left - 0.5 * pace["whole"], pace, early))
    epochs = int(max(_gather(epochs, run.dist)))
    if epochs == cfg.epochs:
        return
    run.log(f"Time budget {cfg.time_budget}: the last epochs took {factor:.0%} of the time "
            f"the first steps predicted; the schedule now ends after {plural(epochs, 'epoch')} "
            f"instead of {cfg.epochs}.")
    _set_epochs(run, epochs, early)


def _epoch_kind(cfg: TrainConfig, row: dict) -> str:
    """``window`` for a metrics row trained on ``early_crop`` windows, else ``whole``."""
    return "window" if row.get("train_size", cfg.size) < cfg.size else "whole"


def _finish_best(run: _Run) -> dict[str, float]:
    """Stores in ``best.pt`` the threshold chosen on validation (Youden's J), and with ``tta``
    its 8-view validation metrics; returns its metrics.

    So a trained model used on new data never falls back to 0.5.
    """
    from .thresholds import decide_threshold

    cfg = run.cfg
    best = load_checkpoint(run.run_dir / "best.pt")
    model = best.build_model().to(run.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    sampler = EpochSampler(len(run.val_ds), seed=0, epoch=0, shuffle=False)

    def score(tta: bool) -> dict[str, np.ndarray]:
        loader = _loader(run.val_ds, sampler, cfg, run.device, seed=0, drop_last=False)
        return evaluate(model, loader, run.device, dtype=run.dtype,
                        channels_last=cfg.channels_last, batch_transform=run.batch_eval, tta=tta)

    out = score(False)
    val = run.val_tab.reset_index(drop=True).iloc[out["row"].astype(int)].assign(
        probability=out["prob"])
    value, info, caveats = decide_threshold(best, val, None, [], split_hash(run.split))
    chosen = info.get("chosen_on") == "val"
    if chosen:
        best.with_threshold(value, {**info, "chosen_by": "bcd train, on the best epoch's weights"})
    if cfg.tta:
        tta = score(True)
        best.metrics = {**best.metrics, "val_auc_tta": roc_auc(tta["target"], tta["prob"]),
                        "val_acc_tta": accuracy(tta["target"], tta["prob"])}
    save_checkpoint(best, run.run_dir / "best.pt")
    run.log((f"Threshold {value:.4f} chosen on validation (Youden's J) and stored in best.pt"
             if chosen else "No threshold stored: " + " ".join(caveats))
            + (f"; 8-view TTA validation AUC {_auc_text(best.metrics['val_auc_tta'])}, accuracy "
               f"{best.metrics['val_acc_tta']:.4f}" if cfg.tta else "") + ".")
    return best.metrics


def _tensorboard(run: _Run):
    if not (run.cfg.tensorboard and run.dist.is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("tensorboard is not installed: pip install tensorboard, or drop "
                        "--tensorboard.") from None
    return SummaryWriter(run.run_dir / "tensorboard")


def _train_epoch(run: _Run, state: RunState) -> dict[str, float]:
    """Trains epoch ``state.epoch + 1`` (from ``state.step``) and validates; returns its row."""
    from tqdm.auto import tqdm

    cfg, epoch, o = run.cfg, state.epoch, run.opt
    window = cfg.window(epoch)
    t0 = time.perf_counter()
    progress = EpochState(step=state.step, loss_sum=state.partial[0],
                          correct=int(state.partial[1]), seen=int(state.partial[2]))
    # Augmentation draws depend only on (seed, epoch), in the workers and out of them. An epoch
    # resumed part-way goes on from the generator state saved with it (dropout included).
    if state.step == 0:
        torch.manual_seed(run_seed(cfg.seed, epoch))
    sampler = EpochSampler(len(run.train_ds), seed=cfg.seed, epoch=epoch,
                           weights=o.sample_weights, rank=run.dist.rank, world=run.dist.world,
                           start=state.step * cfg.batch_size)
    loader = _loader(run.train_ds, sampler, cfg, run.device,
                     seed=run_seed(cfg.seed, epoch, "loader"), drop_last=o.drop_last)
    bar = tqdm(total=o.steps_per_epoch, initial=state.step, desc=f"epoch {epoch + 1}/"
               f"{cfg.epochs}", unit="batch", leave=False,
               disable=not (run.progress and run.dist.is_main))
    try:
        train_one_epoch(run.model, loader, o.optimizer, o.scheduler, o.loss_fn, run.device,
                        dtype=run.dtype, scaler=o.scaler, channels_last=cfg.channels_last,
                        state=progress, bad=state.bad_images, paths=run.train_ds.paths,
                        log_every=cfg.log_every, progress=bar, log=run.log,
                        batch_transform=run.batch_aug,
                        aug_seed=run_seed(cfg.seed, epoch, "batches"), ema=run.ema,
                        window=window, mixup=cfg.mixup)
    finally:
        # An interrupt saves the steps done so far, and what they scored.
        state.step = progress.step
        state.partial = [progress.loss_sum, float(progress.correct), float(progress.seen)]
        bar.close()
    totals = sum(np.array(x) for x in _gather(
        [progress.loss_sum, progress.correct, progress.seen], run.dist))
    train_loss, train_acc = totals[0] / max(1, totals[2]), totals[1] / max(1, totals[2])
    if len(state.bad_images) > cfg.max_bad_fraction * len(run.train_ds):
        raise TrainingError(
            f"{len(state.bad_images)} of {len(run.train_ds)} training images are unreadable "
            f"(limit {cfg.max_bad_fraction:.0%}); run `bcd index {run.root} --verify` to list "
            "them, fix or remove them, or raise max_bad_fraction.")
    row = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
           "lr": o.optimizer.param_groups[0]["lr"], "train_size": window or cfg.size}
    row.update(validate_epoch(run))
    seconds = time.perf_counter() - t0
    row.update(seconds=seconds, images_per_s=totals[2] / seconds)
    return plain(row)


def validate_epoch(run: _Run) -> dict[str, float]:
    """Validation loss, accuracy and AUC over every rank's share; empty without a val subset."""
    from tqdm.auto import tqdm

    if not len(run.val_ds):
        return {}
    cfg = run.cfg
    sampler = EpochSampler(len(run.val_ds), seed=0, epoch=0, shuffle=False,
                           rank=run.dist.rank, world=run.dist.world)
    bar = tqdm(total=math.ceil(len(sampler) / cfg.batch_size), desc="val", unit="batch",
               leave=False, disable=not (run.progress and run.dist.is_main))
    # With averaging, every rank holds the same average: score it (no DDP wrapper needed).
    model = run.eval_model if run.ema is not None else run.model
    out = evaluate(model, _loader(run.val_ds, sampler, cfg, run.device, seed=0,
                                      drop_last=False),
                   run.device, dtype=run.dtype, channels_last=cfg.channels_last,
                   loss_fn=nn.CrossEntropyLoss(), progress=bar, batch_transform=run.batch_eval)
    bar.close()
    parts = _gather(out, run.dist)
    prob = np.concatenate([p["prob"] for p in parts])
    target = np.concatenate([p["target"] for p in parts])
    n_val = sum(len(p["target"]) for p in parts)
    val_loss = sum(p["loss"] * len(p["target"]) for p in parts) / max(1, n_val)
    return {"val_loss": val_loss, "val_acc": accuracy(target, prob),
            "val_auc": roc_auc(target, prob)}


def _record_epoch(run: _Run, state: RunState, row: dict[str, float], tb) -> bool:
    """Advances the state past the epoch and writes its checkpoints; True if it is the best."""
    if "val_auc" in row:
        score = row["val_auc"] if math.isfinite(row["val_auc"]) else -row["val_loss"]
    else:
        score = -row["train_loss"]
    improved = score > state.best_score
    state.epoch, state.step, state.partial = int(row["epoch"]), 0, [0.0, 0.0, 0.0]
    if improved:
        state.best_score, state.best_epoch, state.since_best = score, state.epoch, 0
        state.best_metrics = dict(row)
    else:
        state.since_best += 1
    if run.dist.is_main:
        # best.pt first: a failure between the two writes must never leave a last.pt that
        # names a best epoch that best.pt lacks.
        if improved:
            save_checkpoint(state.to_checkpoint(run, full=False), run.run_dir / "best.pt")
        save_checkpoint(state.to_checkpoint(run, full=True), run.run_dir / "last.pt")
        if tb is not None:
            for k, v in row.items():
                if k != "epoch":
                    tb.add_scalar(k, v, state.epoch)
    return improved


_STOP = threading.Event()
"""Set by SIGTERM during a run; the loops stop at the next batch."""


def _check_stop() -> None:
    if _STOP.is_set():
        raise Terminated("SIGTERM")


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Turns SIGTERM (a cluster's preemption, a closed Colab runtime) into Ctrl-C.

    So a terminated run also saves ``last.pt`` and can be resumed. The handler only sets a
    flag that the training and validation loops check between batches: an exception raised
    from the handler itself could land inside the DataLoader's own shutdown or a checkpoint
    write and leave the process hanging.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        _STOP.set()

    _STOP.clear()
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _STOP.clear()


def _gather(obj, dist_info: DistInfo) -> list:
    if dist_info.world == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * dist_info.world
    dist.all_gather_object(out, obj)
    return out


def _epoch_line(row: dict[str, float], epochs: int, improved: bool, size: int = 0) -> str:
    s = (f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} "
         f"acc {row['train_acc']:.3f}")
    if row.get("train_size", size) < size:
        s += f" ({row['train_size']} px windows)"
    if "val_loss" in row:
        s += (f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} "
              f"auc {_auc_text(row['val_auc'], 3)}")
    return s + f" | {row['images_per_s']:.0f} img/s {row['seconds']:.0f}s" + (
        "  *" if improved else "")


def _auc_text(auc: float, digits: int = 4) -> str:
    """An AUC for a progress line: ``n/a: one class`` when the validation images hold only
    one class (AUC is undefined, not zero)."""
    return format(auc, f".{digits}f") if math.isfinite(auc) else "n/a: one class"


def _closing_line(result: TrainResult, val_tab: pd.DataFrame, cfg: TrainConfig) -> str:
    b = result.best
    if "val_auc" not in b:
        return f"Done. No validation subset; last checkpoint {result.run_dir / 'best.pt'}."
    if val_tab["patient"].ne("").any():
        who = f"{len(val_tab)} images, {val_tab['patient'].nunique()} patients, patient-disjoint"
    elif val_tab["path"].map(layout_split).eq("val").all():
        who = f"{len(val_tab)} images, the data folder's own split"
    else:
        who = f"{len(val_tab)} images, split by image: the data carries no patient ids"
    budget = (f" (the {cfg.time_budget} time budget allowed {plural(cfg.epochs, 'epoch')})"
              if cfg.time_budget else "")
    tta = (f"; with 8-view TTA AUC {_auc_text(b['val_auc_tta'])}, accuracy "
           f"{b['val_acc_tta']:.4f} at 0.5" if "val_auc_tta" in b else "")
    return (f"Done. Best epoch {result.best_epoch}{budget}: validation accuracy "
            f"{b['val_acc']:.4f} at 0.5, AUC {_auc_text(b['val_auc'])}{tta} ({who}). Checkpoint: "
            f"{result.run_dir / 'best.pt'}")

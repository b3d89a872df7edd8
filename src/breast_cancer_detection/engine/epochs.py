"""One epoch of a run: train on this rank's share, validate over every rank's, and record
the epoch (its checkpoints and its progress line); :class:`RunState`, how far a run has got.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..checkpoint import Checkpoint, ResumeState, save_checkpoint
from ..data.breakhis import CLASSES
from ..data.datasets import EpochSampler, run_seed
from ..data.splits import split_hash
from ..files import plain
from ..metrics import accuracy, roc_auc
from .loop import EpochState, TrainingError, evaluate, train_one_epoch
from .processes import gather, make_loader, rng_state
from .setup import Run


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
        """The state a checkpoint was saved in (``last.pt``, to resume from)."""
        partial = ckpt.resume.partial if ckpt.resume and ckpt.resume.partial else None
        return cls(epoch=ckpt.epoch, step=ckpt.resume.step if ckpt.resume else 0,
                   partial=list(partial or [0.0, 0.0, 0.0]),
                   best_score=ckpt.best_score, best_epoch=ckpt.best_epoch,
                   since_best=ckpt.since_best, best_metrics=dict(ckpt.metrics),
                   bad_images=dict(ckpt.bad_images))

    def to_checkpoint(self, run: Run, *, full: bool) -> Checkpoint:
        """The run's checkpoint now; ``full`` adds what resuming needs (``last.pt``)."""
        cfg, split = run.cfg, run.split
        resume_state = None
        if full:
            o = run.opt
            resume_state = ResumeState(
                optimizer=o.optimizer.state_dict(), scheduler=o.scheduler.state_dict(),
                scaler=o.scaler.state_dict() if o.scaler is not None else {},
                rng=rng_state(), step=self.step, partial=list(self.partial),
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


def train_epoch(run: Run, state: RunState) -> dict[str, float]:
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
    loader = make_loader(run.train_ds, sampler, cfg, run.device,
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
    totals = sum(np.array(x) for x in gather(
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


def validate_epoch(run: Run) -> dict[str, float]:
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
    out = evaluate(model, make_loader(run.val_ds, sampler, cfg, run.device, seed=0,
                                      drop_last=False),
                   run.device, dtype=run.dtype, channels_last=cfg.channels_last,
                   loss_fn=nn.CrossEntropyLoss(), progress=bar, batch_transform=run.batch_eval)
    bar.close()
    parts = gather(out, run.dist)
    prob = np.concatenate([p["prob"] for p in parts])
    target = np.concatenate([p["target"] for p in parts])
    n_val = sum(len(p["target"]) for p in parts)
    val_loss = sum(p["loss"] * len(p["target"]) for p in parts) / max(1, n_val)
    return {"val_loss": val_loss, "val_acc": accuracy(target, prob),
            "val_auc": roc_auc(target, prob)}


def record_epoch(run: Run, state: RunState, row: dict[str, float], tb) -> bool:
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


def epoch_line(row: dict[str, float], epochs: int, improved: bool, size: int = 0) -> str:
    """The progress line of an epoch's metrics row (``*`` when it is the best so far; its
    window size when it trained on windows smaller than ``size``)."""
    s = (f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} "
         f"acc {row['train_acc']:.3f}")
    if row.get("train_size", size) < size:
        s += f" ({row['train_size']} px windows)"
    if "val_loss" in row:
        s += (f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} "
              f"auc {auc_text(row['val_auc'], 3)}")
    return s + f" | {row['images_per_s']:.0f} img/s {row['seconds']:.0f}s" + (
        "  *" if improved else "")


def auc_text(auc: float, digits: int = 4) -> str:
    """An AUC for a progress line: ``n/a: one class`` when the validation images hold only
    one class (AUC is undefined, not zero)."""
    return format(auc, f".{digits}f") if math.isfinite(auc) else "n/a: one class"

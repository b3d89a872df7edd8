"""A run from start to end: :func:`fit` (a new run) and :func:`resume` (one from its
``last.pt``), which train epoch by epoch, then store the threshold chosen on validation.

``runs/NAME/`` receives ``config.yaml``, ``split.csv``, ``metrics.csv``, ``last.pt`` and
``best.pt``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import TrainConfig, load_config
from ..data.breakhis import layout_split
from ..data.datasets import EpochSampler
from ..data.splits import split_hash
from ..errors import UserError
from ..files import plural
from ..metrics import accuracy, roc_auc
from .budget import plan_epochs, replan
from .epochs import RunState, auc_text, epoch_line, record_epoch, train_epoch
from .loop import evaluate
from .processes import check_stop, end_distributed, make_loader, sigterm_as_interrupt
from .setup import Run, build_run, new_run_dir


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    best_epoch: int
    best: dict[str, float]
    last: dict[str, float]
    bad_images: dict[str, str]
    stopped_early: bool = False


def fit(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Trains a new model as ``cfg`` says and writes the run folder.

    ``runs/NAME/`` receives ``config.yaml``, ``split.csv``, ``metrics.csv``, ``last.pt`` (every
    epoch, and on Ctrl-C or SIGTERM) and ``best.pt`` (best validation AUC).

    Raises:
        TrainingError: too many unreadable images, or a diverged loss.
        KeyboardInterrupt: after saving ``last.pt`` and printing how to resume.
    """
    started = time.perf_counter()
    run_dir = new_run_dir(cfg)
    fresh = not run_dir.exists()
    try:
        run = build_run(cfg, run_dir, None, progress)
        plan_epochs(run, started)
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
    run = build_run(cfg, run_dir, ckpt, progress)
    state = RunState.from_checkpoint(ckpt)
    run.log(f"Resuming {run_dir} at epoch {state.epoch + 1}"
            + (f", step {state.step}" if state.step else ""))
    return _train(run, state)


def _train(run: Run, state: RunState) -> TrainResult:
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
    with sigterm_as_interrupt():
        try:
            while state.epoch < run.cfg.epochs:
                row = train_epoch(run, state)
                replan(run, history, row)  # before the checkpoints, which carry the schedule
                improved = record_epoch(run, state, row, tb)
                history = pd.concat([history, pd.DataFrame([row])], ignore_index=True)
                if run.dist.is_main:
                    history.to_csv(metrics_path, index=False)
                last_row = row
                run.log(epoch_line(row, run.cfg.epochs, improved, run.cfg.size))
                check_stop()  # a SIGTERM during the bookkeeping above
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
        end_distributed()
    return result


def _finish_best(run: Run) -> dict[str, float]:
    """Stores in ``best.pt`` the threshold chosen on validation (Youden's J), and with ``tta``
    its 8-view validation metrics; returns its metrics.

    So a trained model used on new data never falls back to 0.5.
    """
    from ..thresholds import decide_threshold

    cfg = run.cfg
    best = load_checkpoint(run.run_dir / "best.pt")
    model = best.build_model().to(run.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    sampler = EpochSampler(len(run.val_ds), seed=0, epoch=0, shuffle=False)

    def score(tta: bool) -> dict[str, np.ndarray]:
        loader = make_loader(run.val_ds, sampler, cfg, run.device, seed=0, drop_last=False)
        return evaluate(model, loader, run.device, dtype=run.dtype,
                        channels_last=cfg.channels_last, batch_transform=run.batch_eval,
                        tta=tta)

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
            + (f"; 8-view TTA validation AUC {auc_text(best.metrics['val_auc_tta'])}, accuracy "
               f"{best.metrics['val_acc_tta']:.4f}" if cfg.tta else "") + ".")
    return best.metrics


def _tensorboard(run: Run):
    if not (run.cfg.tensorboard and run.dist.is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("tensorboard is not installed: pip install tensorboard, or drop "
                        "--tensorboard.") from None
    return SummaryWriter(run.run_dir / "tensorboard")


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
    tta = (f"; with 8-view TTA AUC {auc_text(b['val_auc_tta'])}, accuracy "
           f"{b['val_acc_tta']:.4f} at 0.5" if "val_auc_tta" in b else "")
    return (f"Done. Best epoch {result.best_epoch}{budget}: validation accuracy "
            f"{b['val_acc']:.4f} at 0.5, AUC {auc_text(b['val_auc'])}{tta} ({who}). Checkpoint: "
            f"{result.run_dir / 'best.pt'}")

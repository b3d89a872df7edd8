"""The time budget (``TrainConfig.time_budget``): timing the first steps, planning how many
epochs fit, and re-planning from the measured pace of the epochs so far.

:func:`plan_epochs` sizes a new run before its first epoch; :func:`replan` corrects the plan
after each epoch; both move the run's end (and the cosine's) with :func:`set_epochs`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..config import TrainConfig
from ..data.datasets import EpochSampler
from ..errors import UserError
from ..files import plural
from .loop import EpochState, evaluate, train_one_epoch
from .processes import gather, make_loader
from .setup import Run, averaged, set_schedule_end


def time_steps(run: Run, steps: int, *, tta: bool = False, compiled: bool = False,
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
    ema = averaged(model, cfg.ema) if cfg.ema is not None else None
    order = EpochSampler(len(run.train_ds), seed=cfg.seed, epoch=0, world=1).indices

    def train(first: int, n: int) -> EpochState:
        sampler = EpochSampler(0, seed=0, epoch=0)
        sampler.indices = order[first * cfg.batch_size:(first + n) * cfg.batch_size]
        loader = make_loader(run.train_ds, sampler, cfg, run.device, seed=0, drop_last=False)
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
        evaluate(forward, make_loader(run.val_ds, vs, cfg, run.device, seed=0,
                                      drop_last=False),
                 run.device, dtype=run.dtype, channels_last=cfg.channels_last,
                 batch_transform=run.batch_eval, tta=tta)
        val_s = (time.perf_counter() - t0) * len(run.val_ds) / n
    torch.set_rng_state(rng)
    return step_s, val_s


def epoch_costs(cfg: TrainConfig, epochs: int, pace: dict[str, float],
                early: int | None = None) -> list[float]:
    """Predicted seconds of each of ``epochs`` epochs under ``cfg``'s early windows.

    ``pace`` holds ``whole`` and ``window`` (seconds of an epoch on whole images, and on
    ``early_crop`` windows, validation included). ``early`` fixes how many epochs are
    windowed (once they have run); by default it follows ``early_fraction`` of ``epochs``."""
    if early is None:
        early = TrainConfig.from_dict({**cfg.to_dict(), "epochs": epochs}).early_epochs
    return [pace["window"] if e < early else pace["whole"] for e in range(epochs)]


def fitting_epochs(cfg: TrainConfig, done: int, most: int, left: float,
                   pace: dict[str, float], early: int | None = None) -> int:
    """The most epochs (``done`` to ``most``) whose epochs after ``done`` cost <= ``left``."""
    best = done
    for epochs in range(done + 1, most + 1):
        if sum(epoch_costs(cfg, epochs, pace, early)[done:]) <= left:
            best = epochs
    return best


def plan_epochs(run: Run, started: float) -> None:
    """Sizes the run to ``time_budget``, or warns when a GPU recipe runs on a CPU."""
    cfg = run.cfg
    on_cpu_gpu_recipe = cfg.expects_gpu and run.device.type != "cuda"
    if not (cfg.time_budget or on_cpu_gpu_recipe):
        return
    from ..config import parse_duration

    step_s, val_s = time_steps(run, steps=12)
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
        window_s, _ = time_steps(run, steps=12, window=cfg.early_crop, validate=False)
        pace["window"] = steps * window_s + val_s
        window_note = f" ({window_s:.2f} s on {cfg.early_crop} px windows)"
    budget = parse_duration(cfg.time_budget)
    run.started, run.final_s, run.pace, run.most_epochs = started, final_s, pace, cfg.epochs
    # 5% kept back: a run's later steps are a little slower than the timed ones (progress
    # bars, checkpoint writes, a busier page cache); replan corrects the rest.
    left = 0.95 * budget - (time.perf_counter() - started) - final_s
    epochs = max(1, fitting_epochs(cfg, 0, cfg.epochs, left, pace))
    epochs = int(max(gather(epochs, run.dist)))  # every rank runs the same schedule
    set_epochs(run, epochs)
    early = run.cfg.early_epochs
    run.log(f"Time budget {cfg.time_budget}: {steps} steps x {step_s:.2f} s{window_note} + "
            f"{val_s:.0f} s validation per epoch -> {epochs} epoch(s) (at most {cfg.epochs})"
            + (f", the first {early} on {cfg.early_crop} px windows" if early else "") + ".")


def set_epochs(run: Run, epochs: int, early: int | None = None) -> None:
    """Moves the run's end (and the cosine's) to ``epochs``, saved in ``config.yaml``.

    ``early`` keeps that many epochs on ``early_crop`` windows (those already trained), by
    setting ``early_fraction`` to ``early / epochs``; by default the share stays."""
    if epochs == run.cfg.epochs:
        return
    changes: dict[str, Any] = {"epochs": epochs}
    if early is not None and run.cfg.early_crop:
        changes["early_fraction"] = early / epochs
    run.cfg = TrainConfig.from_dict({**run.cfg.to_dict(), **changes})
    set_schedule_end(run.opt, epochs)
    if run.dist.is_main:
        run.cfg.save(run.run_dir / "config.yaml")


def replan(run: Run, history: pd.DataFrame, row: dict) -> None:
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
    from ..config import parse_duration

    # The first epoch pays once-only costs (workers starting, the cache's first reads) that
    # would make the plan shrink for nothing: its pace is not used.
    rows = [r for r in [*history.to_dict("records"), row] if int(r["epoch"]) > 1]
    if not rows:
        return
    factors = {}
    for kind in ("window", "whole"):
        recent = [r for r in rows if epoch_kind(cfg, r) == kind][-3:]
        if recent:
            factors[kind] = float(np.mean([r["seconds"] / run.pace[kind] for r in recent]))
    factor = factors[epoch_kind(cfg, row)]
    pace = {k: v * factors.get(k, factor) for k, v in run.pace.items()}
    left = 0.95 * parse_duration(cfg.time_budget) - (time.perf_counter() - run.started) - (
        run.final_s)
    # Past the windows, their number is fixed: what changes is how many whole epochs follow.
    early = cfg.early_epochs if cfg.early_crop and done >= cfg.early_epochs else None
    # No time for another epoch: stop here (the cosine ends unfinished) rather than overrun.
    epochs = fitting_epochs(cfg, done, cfg.epochs, left, pace, early)
    windowed_first_half = done < cfg.epochs / 2 and (
        not cfg.early_crop or done < cfg.early_epochs)
    first_whole = bool(cfg.early_crop) and 1 <= done - cfg.early_epochs <= 2
    if epochs == cfg.epochs and (windowed_first_half or first_whole):
        # Grown only with half an epoch to spare, so that a plan on the edge does not flip
        # back and forth between two lengths.
        epochs = max(epochs, fitting_epochs(cfg, done, run.most_epochs,
                                            left - 0.5 * pace["whole"], pace, early))
    epochs = int(max(gather(epochs, run.dist)))
    if epochs == cfg.epochs:
        return
    run.log(f"Time budget {cfg.time_budget}: the last epochs took {factor:.0%} of the time "
            f"the first steps predicted; the schedule now ends after {plural(epochs, 'epoch')} "
            f"instead of {cfg.epochs}.")
    set_epochs(run, epochs, early)


def epoch_kind(cfg: TrainConfig, row: dict) -> str:
    """``window`` for a metrics row trained on ``early_crop`` windows, else ``whole``."""
    return "window" if row.get("train_size", cfg.size) < cfg.size else "whole"

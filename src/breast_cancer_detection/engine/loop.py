"""The loops over batches: :func:`train_one_epoch` and :func:`evaluate`.

They take plain arguments (a model, a loader, a device, an optimiser...), not a run, so that
benchmarks and other code can drive them directly; :mod:`.epochs` calls them for a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data.batch_augment import random_windows
from ..errors import UserError
from .processes import check_stop


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (bad data, a diverged loss); the last good checkpoint is kept."""


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
            check_stop()
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
            _optimiser_step(loss, optimizer, scaler)
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


def _optimiser_step(loss: torch.Tensor, optimizer, scaler) -> None:
    """Back-propagates ``loss`` into cleared gradients and steps ``optimizer``; with a
    gradient ``scaler`` (float16 autocast), through it."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


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
    from ..data.transforms import view_mean

    model.eval()
    probs, targets, rows, loss_sum = [], [], [], 0.0
    for batch in loader:
        check_stop()
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

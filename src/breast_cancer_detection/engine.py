"""The training loop, evaluation pass and checkpoints; one process or torchrun DDP."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import __version__
from .config import TrainConfig, load_config
from .data.breakhis import CLASSES, build_index
from .data.datasets import EpochSampler, ImageTableDataset, collate_skip_bad
from .data.splits import check_split, load_split, make_split, split_hash, write_split
from .errors import UserError
from .metrics import accuracy, roc_auc
from .models import create_model

CHECKPOINT_FORMAT = "bcd-checkpoint/1"


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (bad data, a diverged loss); the last good checkpoint is kept."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, damaged, or holds more than plain data."""


# ----------------------------------------------------------------------------- devices


@dataclass
class DistInfo:
    """Where this process stands in a (possibly one-process) data-parallel run."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error with advice."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {spec!r} asked for, but PyTorch sees no CUDA GPU here. Use "
                        "--device cpu, or on Colab pick Runtime > Change runtime type > GPU.")
    return device


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


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this setting and device; None means full precision.

    On CUDA ``auto`` picks bf16 where the card has it, else fp16. On the CPU only an explicit
    ``bf16`` turns autocast on (``auto`` and ``fp16`` stay in float32): CPUs with native bf16
    (AVX512-BF16 or AMX) train convolutions about twice as fast in it, others emulate it slowly.
    """
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if device.type == "cpu" and amp == "bf16":
        return torch.bfloat16
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (oneDNN's own check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> Path:
    """Writes a checkpoint atomically: a crash mid-save leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Loads a checkpoint with ``weights_only=True``: plain data and tensors, no code.

    Raises:
        CheckpointError: missing file, damaged file, or one that holds pickled objects.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint. Train one with `bcd train`, or "
                              "download a released checkpoint.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        if "GLOBAL" in str(e):  # torch's wording for a pickled class or function
            raise CheckpointError(
                f"{path} holds pickled Python objects, which could run code when loaded; it "
                "was refused. Use a checkpoint written by `bcd train`.") from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {first}); the file "
                              "may be truncated: re-download or re-train it.") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a bcd checkpoint (no '{CHECKPOINT_FORMAT}' tag).")
    return ckpt


def _versions() -> dict[str, str]:
    import torchvision

    return {"bcd": __version__, "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__),
            "python": platform.python_version(), "numpy": np.__version__}


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


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    """numpy scalars become Python numbers, so the dict loads with weights_only=True."""
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in d.items()}


# ----------------------------------------------------------------------------- one epoch


def _scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decay weights only: decaying biases and norm scales only hurts.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


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
                    aug_seed: int = 0) -> EpochState:
    """Trains over ``loader`` once.

    Args:
        state: Updated in place after every step, so a caller that catches an interrupt knows
            how far the epoch got.
        bad: Unreadable images seen so far (path -> reason), added to in place.
        progress: A tqdm bar to advance, or None.
        batch_transform: Augmentation applied to whole uint8 batches on the device (e.g.
            :class:`bcd.data.transforms.BatchAugment`); None when the loader already did it.
        aug_seed: With ``batch_transform``, batch k is augmented with seed ``aug_seed + k``
            (k counted from the start of the epoch, so a resumed epoch draws the same).

    Raises:
        TrainingError: the loss became NaN or infinite.
    """
    state = state or EpochState()
    bad = {} if bad is None else bad
    model.train()
    running = torch.zeros(2, device=device)  # loss sum, correct count; read only at log points
    for batch in loader:
        if batch["bad"]:
            _report_bad(batch, bad, paths or [], log)
        if batch["x"] is None:
            continue
        x = batch["x"].to(device, non_blocking=True)
        y = batch["y"].to(device, non_blocking=True)
        if batch_transform is not None:
            g = torch.Generator(device=device).manual_seed(aug_seed + state.step)
            x = batch_transform(x, generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
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
    _sync_running(state, running)
    return state


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
    from .data.transforms import dihedral

    model.eval()
    probs, targets, rows, loss_sum = [], [], [], 0.0
    for batch in loader:
        if batch["x"] is None:
            continue
        x = batch["x"].to(device, non_blocking=True)
        if batch_transform is not None:
            x = batch_transform(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            if tta:
                p = torch.stack([torch.softmax(model(dihedral(x, k)).float(), 1)
                                 for k in range(8)]).mean(0)
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


# ----------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    best_epoch: int
    best: dict[str, float]
    last: dict[str, float]
    bad_images: dict[str, str]
    stopped_early: bool = False


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
    name = cfg.name or f"{cfg.model}-{datetime.now():%Y%m%d-%H%M%S}"
    run = Path(cfg.runs_dir) / name
    if (run / "last.pt").exists():
        raise UserError(f"{run} already holds a run. Resume it with `bcd train --resume {run}`, "
                        "or choose another --name.")
    return run


def _loader(ds, sampler, cfg: TrainConfig, device: torch.device, *, seed: int, drop_last: bool):
    kw: dict[str, Any] = {}
    # More workers than cores only adds switching (and a warning from PyTorch).
    workers = min(cfg.workers, os.cpu_count() or 1)
    if workers > 0:
        kw["prefetch_factor"] = 4 if device.type == "cuda" else 2
    return torch.utils.data.DataLoader(
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
    cache = None
    if cfg.cache != "off":
        from .data.cache import find_cache, open_cache

        both = pd.concat([train_tab, val_tab])
        size = cfg.resize or cfg.size
        cache = (find_cache(root, both, size) if cfg.cache == "auto"
                 else open_cache(cfg.cache, root, both))
    on_batches = cfg.batch_augment == "on" or (
        cfg.batch_augment == "auto" and device.type == "cuda" and cache is not None)
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


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Turns SIGTERM (a cluster's preemption, a closed Colab runtime) into Ctrl-C.

    So a terminated run also saves ``last.pt`` and can be resumed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _gather(obj, dist_info: DistInfo) -> list:
    if dist_info.world == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * dist_info.world
    dist.all_gather_object(out, obj)
    return out


def _checkpoint(raw_model: nn.Module, cfg: TrainConfig, pre, aug, split: pd.DataFrame,
                **extra) -> dict[str, Any]:
    patients = {s: sorted(set(g["patient"]) - {""}) for s, g in split.groupby("split")}
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": cfg.model,
        "num_classes": len(CLASSES),
        "classes": list(CLASSES),
        "model": {k: v.detach().cpu() for k, v in raw_model.state_dict().items()},
        "preprocessing": pre.to_dict(),
        "augment": aug.to_dict(),
        "config": cfg.to_dict(),
        "split_hash": split_hash(split),
        "split_patients": patients,
        "threshold": None,
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def fit(cfg: TrainConfig, *, resume: str | Path | None = None, progress: bool = True,
        overrides: dict[str, Any] | None = None) -> TrainResult:
    """Trains a model as ``cfg`` says and writes the run folder.

    ``runs/NAME/`` receives ``config.yaml``, ``split.csv``, ``metrics.csv``, ``last.pt`` (every
    epoch, and on Ctrl-C) and ``best.pt`` (best validation AUC).

    Args:
        cfg: The settings; ignored when resuming (the run's own ``config.yaml`` is used).
        resume: A run folder to continue from its ``last.pt``.
        progress: Show progress bars.
        overrides: With ``resume``, settings to change (e.g. ``{"epochs": 30}``).

    Raises:
        TrainingError: too many unreadable images, or a diverged loss.
        KeyboardInterrupt: after saving ``last.pt`` and printing how to resume.
    """
    from tqdm.auto import tqdm

    from .data.transforms import Augmentation, Preprocessing

    ckpt = None
    if resume is not None:
        run_dir = Path(resume)
        cfg = load_config(run_dir / "config.yaml")
        if overrides:
            cfg = TrainConfig.from_dict({**cfg.to_dict(), **overrides})
        ckpt = load_checkpoint(run_dir / "last.pt")
    else:
        run_dir = _new_run_dir(cfg)
    dist_info = _init_distributed(cfg)
    device = dist_info.device

    def log(msg: str) -> None:
        if dist_info.is_main:
            tqdm.write(msg, file=sys.stdout)

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
    val_tab = split[split["split"] == "val"]

    pre = Preprocessing(size=cfg.size, resize=cfg.resize)
    aug = Augmentation.from_dict(cfg.augment)
    train_ds, val_ds, batch_aug, batch_eval = _datasets(cfg, root, train_tab, val_tab, pre, aug,
                                                        device, log)
    counts = np.bincount(train_tab["target"].to_numpy(dtype=int), minlength=2)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every retry
    model = create_model(cfg.model, num_classes=len(CLASSES), pretrained=cfg.pretrained,
                         weights=cfg.weights, freeze_backbone=cfg.freeze_backbone)
    raw_model = model
    model.to(device)
    # channels_last also speeds up oneDNN convolutions on CPUs (~1.1-2x measured here).
    channels_last = cfg.channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if dist_info.world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)

    dtype = amp_dtype(cfg.amp, device)
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16():
        log("Note: amp=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) is emulated "
            "and slower than float32; pass --amp off.")
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    class_weights = None
    if cfg.balance == "loss":
        class_weights = torch.tensor(counts.sum() / (2.0 * counts), dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(
        weight=class_weights.to(device) if class_weights is not None else None,
        label_smoothing=cfg.label_smoothing)
    eval_loss = nn.CrossEntropyLoss()
    sample_weights = None
    if cfg.balance == "sampler":
        sample_weights = torch.tensor(1.0 / counts[train_tab["target"].to_numpy(dtype=int)])

    n_per_rank = math.ceil(len(train_ds) / dist_info.world)
    drop_last = n_per_rank > cfg.batch_size
    steps_per_epoch = (n_per_rank // cfg.batch_size if drop_last
                       else math.ceil(n_per_rank / cfg.batch_size))
    optimizer = torch.optim.AdamW(_param_groups(raw_model, cfg.weight_decay), lr=cfg.lr)
    scheduler = _scheduler(optimizer, round(cfg.warmup_epochs * steps_per_epoch),
                           cfg.epochs * steps_per_epoch)

    start_epoch, start_step, best_score, best_epoch, since_best = 0, 0, -math.inf, 0, 0
    bad: dict[str, str] = {}
    best_metrics: dict[str, float] = {}
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        start_epoch, start_step = ckpt["epoch"], ckpt["step"]
        best_score, best_epoch = ckpt["best_score"], ckpt["best_epoch"]
        since_best, bad, best_metrics = ckpt["since_best"], dict(ckpt["bad_images"]), dict(
            ckpt.get("best_metrics", {}))
        log(f"Resuming {run_dir} at epoch {start_epoch + 1}"
            + (f", step {start_step}" if start_step else ""))
    if ckpt is not None and start_epoch >= cfg.epochs:
        raise UserError(f"{run_dir} already trained {start_epoch} epochs; pass a larger --epochs "
                        "to train on.")

    metrics_path = run_dir / "metrics.csv"
    history = (pd.read_csv(metrics_path) if ckpt is not None and metrics_path.exists()
               else pd.DataFrame())
    if len(history):
        # Rows written after the checkpoint (a crash between the two writes) are redone.
        history = history[history["epoch"] <= start_epoch]
    tb = None
    if cfg.tensorboard and dist_info.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("tensorboard is not installed: pip install tensorboard, or drop "
                            "--tensorboard.") from None
        tb = SummaryWriter(run_dir / "tensorboard")

    def state_dict_for(epoch: int, step: int, full: bool) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "epoch": epoch, "step": step, "best_score": best_score, "best_epoch": best_epoch,
            "since_best": since_best, "bad_images": dict(bad), "best_metrics": best_metrics,
            "metrics": best_metrics,
        }
        if full:
            extra.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         scaler=scaler.state_dict() if scaler is not None else {},
                         rng=_rng_state())
        return _checkpoint(raw_model, cfg, pre, aug, split, **extra)

    log(f"Run folder {run_dir}: {len(train_ds)} train / {len(val_ds)} val images, "
        f"{cfg.model} on {device}" + (f" x{dist_info.world}" if dist_info.world > 1 else "")
        + (f", {str(dtype).removeprefix('torch.')} autocast" if dtype else ""))
    last_row: dict[str, float] = {}
    stopped_early = False
    epoch = start_epoch
    state = EpochState()
    with _sigterm_as_interrupt():
        try:
            for epoch in range(start_epoch, cfg.epochs):
                t0 = time.perf_counter()
                step0 = start_step if epoch == start_epoch else 0
                state = EpochState(step=step0)
                # Augmentation draws depend only on (seed, epoch), in the workers and out of them.
                torch.manual_seed(cfg.seed * 1_000_003 + epoch)
                sampler = EpochSampler(len(train_ds), seed=cfg.seed, epoch=epoch,
                                       weights=sample_weights, rank=dist_info.rank,
                                       world=dist_info.world, start=step0 * cfg.batch_size)
                loader = _loader(train_ds, sampler, cfg, device, seed=cfg.seed * 7919 + epoch,
                                 drop_last=drop_last)
                bar = tqdm(total=steps_per_epoch, initial=step0, desc=f"epoch {epoch + 1}/"
                           f"{cfg.epochs}", unit="batch", leave=False,
                           disable=not (progress and dist_info.is_main))
                train_one_epoch(model, loader, optimizer, scheduler, loss_fn, device, dtype=dtype,
                                scaler=scaler, channels_last=channels_last, state=state, bad=bad,
                                paths=train_ds.paths, log_every=cfg.log_every, progress=bar,
                                log=log, batch_transform=batch_aug,
                                aug_seed=(cfg.seed * 1_000_003 + epoch) * 100_003)
                bar.close()
                totals = sum(np.array(x) for x in _gather(
                    [state.loss_sum, state.correct, state.seen], dist_info))
                train_loss, train_acc = totals[0] / max(1, totals[2]), totals[1] / max(1, totals[2])
                if len(bad) > cfg.max_bad_fraction * len(train_ds):
                    raise TrainingError(
                        f"{len(bad)} of {len(train_ds)} training images are unreadable (limit "
                        f"{cfg.max_bad_fraction:.0%}); run `bcd index {root} --verify` to list "
                        "them, fix or remove them, or raise max_bad_fraction.")
                row = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
                       "lr": optimizer.param_groups[0]["lr"]}
                if len(val_ds):
                    val_sampler = EpochSampler(len(val_ds), seed=0, epoch=0, shuffle=False,
                                               rank=dist_info.rank, world=dist_info.world)
                    vbar = tqdm(total=math.ceil(len(val_sampler) / cfg.batch_size), desc="val",
                                unit="batch", leave=False,
                                disable=not (progress and dist_info.is_main))
                    out = evaluate(model, _loader(val_ds, val_sampler, cfg, device, seed=0,
                                                  drop_last=False),
                                   device, dtype=dtype, channels_last=channels_last,
                                   loss_fn=eval_loss, progress=vbar, batch_transform=batch_eval,
                               tta=cfg.tta)
                    vbar.close()
                    parts = _gather(out, dist_info)
                    prob = np.concatenate([p["prob"] for p in parts])
                    target = np.concatenate([p["target"] for p in parts])
                    n_val = sum(len(p["target"]) for p in parts)
                    val_loss = sum(p["loss"] * len(p["target"]) for p in parts) / max(1, n_val)
                    row.update(val_loss=val_loss, val_acc=accuracy(target, prob),
                               val_auc=roc_auc(target, prob))
                    score = row["val_auc"] if math.isfinite(row["val_auc"]) else -val_loss
                else:
                    score = -train_loss
                seconds = time.perf_counter() - t0
                row.update(seconds=seconds, images_per_s=totals[2] / seconds)
                row = _plain(row)
                improved = score > best_score
                if improved:
                    best_score, best_epoch, since_best = score, epoch + 1, 0
                    best_metrics = dict(row)
                else:
                    since_best += 1
                if dist_info.is_main:
                    save_checkpoint(state_dict_for(epoch + 1, 0, full=True), run_dir / "last.pt")
                    if improved:
                        save_checkpoint(state_dict_for(epoch + 1, 0, full=False),
                                        run_dir / "best.pt")
                    history = pd.concat([history, pd.DataFrame([row])], ignore_index=True)
                    history.to_csv(metrics_path, index=False)
                    if tb is not None:
                        for k, v in row.items():
                            if k != "epoch":
                                tb.add_scalar(k, v, epoch + 1)
                last_row = row
                log(_epoch_line(row, cfg.epochs, improved))
                if cfg.early_stop and since_best >= cfg.early_stop:
                    log(f"Early stop: no better validation AUC for {since_best} epochs.")
                    stopped_early = True
                    break
        except KeyboardInterrupt:
            if dist_info.is_main:
                # Completed steps of this epoch are kept; resuming continues with the next batch.
                save_checkpoint(state_dict_for(epoch, state.step, full=True), run_dir / "last.pt")
                print(f"\nInterrupted at epoch {epoch + 1}, step {state.step}. Saved "
                      f"{run_dir / 'last.pt'}. Resume with: bcd train --resume {run_dir}",
                      file=sys.stderr)
            raise
        finally:
            if tb is not None:
                tb.close()
    if bad:
        log(f"{len(bad)} unreadable training image(s) were skipped: "
            + ", ".join(list(bad)[:5]) + (" ..." if len(bad) > 5 else ""))
    if dist_info.is_main and not (run_dir / "best.pt").exists():
        save_checkpoint(state_dict_for(epoch + 1, 0, full=False), run_dir / "best.pt")
    result = TrainResult(run_dir, best_epoch, best_metrics, last_row, bad, stopped_early)
    log(_closing_line(result, val_tab))
    return result


def _epoch_line(row: dict[str, float], epochs: int, improved: bool) -> str:
    s = (f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} "
         f"acc {row['train_acc']:.3f}")
    if "val_loss" in row:
        s += (f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} "
              f"auc {row['val_auc']:.3f}")
    return s + f" | {row['images_per_s']:.0f} img/s {row['seconds']:.0f}s" + (
        "  *" if improved else "")


def _closing_line(result: TrainResult, val_tab: pd.DataFrame) -> str:
    b = result.best
    if "val_auc" not in b:
        return f"Done. No validation subset; last checkpoint {result.run_dir / 'best.pt'}."
    if val_tab["patient"].ne("").any():
        who = f"{len(val_tab)} images, {val_tab['patient'].nunique()} patients, patient-disjoint"
    else:
        who = f"{len(val_tab)} images, the data folder's own split"
    return (f"Done. Best epoch {result.best_epoch}: validation accuracy {b['val_acc']:.4f}, "
            f"AUC {b['val_auc']:.4f} ({who}). Checkpoint: "
            f"{result.run_dir / 'best.pt'}")

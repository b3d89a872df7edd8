"""The processes of a run: their place in a (torchrun) process group, their random generators,
SIGTERM, and the DataLoader's worker processes.

SIGTERM (a cluster's preemption, ``timeout``, a closed Colab runtime) is turned into Ctrl-C:
a flag that the loops check between batches (:func:`check_stop`), so that a terminated run
saves ``last.pt``. DataLoader workers ignore it and leave the shutdown to the main process
(:class:`Loader`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import signal
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..checkpoint import resolve_device
from ..config import TrainConfig
from ..data.datasets import collate_skip_bad

# ----------------------------------------------------------------------------- process group


@dataclass
class DistInfo:
    """Where this process stands in a (possibly one-process) data-parallel run."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: TrainConfig) -> DistInfo:
    """This process's place in the run: joins the torchrun process group when there is one
    (``WORLD_SIZE`` > 1), and takes its rank's GPU."""
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


def gather(obj, dist_info: DistInfo) -> list:
    """``obj`` from every rank, in rank order (``[obj]`` in a one-process run)."""
    if dist_info.world == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * dist_info.world
    dist.all_gather_object(out, obj)
    return out


def end_distributed() -> None:
    """Ends the torchrun process group once every rank has finished (rank 0 goes on alone to
    choose the threshold): a rank that exits while another still holds the group can abort in
    gloo's teardown (SIGABRT, "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- random generators


def rng_state() -> dict[str, Any]:
    """This process's generator states (torch, Python, numpy, CUDA), as a checkpoint stores
    them."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores the generator states :func:`rng_state` saved (a resumed run goes on drawing
    as the interrupted one would have)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 0, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


# ----------------------------------------------------------------------------- signals


class Terminated(KeyboardInterrupt):
    """SIGTERM during training: handled like Ctrl-C (``last.pt`` saved), exit code 143."""


_STOP = threading.Event()
"""Set by SIGTERM during a run; the loops stop at the next batch."""


def check_stop() -> None:
    """Raises :class:`Terminated` once SIGTERM has arrived (the loops call it between
    batches)."""
    if _STOP.is_set():
        raise Terminated("SIGTERM")


@contextlib.contextmanager
def sigterm_as_interrupt():
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


# ----------------------------------------------------------------------------- worker processes


def ignore_sigterm(worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: SIGTERM ignored, and killed with the main
    process (on Linux)."""
    # `timeout`, SLURM and systemd signal the whole process group. A worker that dies of it
    # makes the main process fail inside backward with "DataLoader worker killed"; ignoring it
    # here leaves the shutdown to the main process, which saves last.pt and stops the workers.
    # The worker starts with SIGTERM blocked (Loader.__iter__): one that arrived since the
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


class Loader(torch.utils.data.DataLoader):
    """A DataLoader whose workers survive a SIGTERM to the process group (see above)."""

    def __iter__(self):
        # Workers start with SIGTERM blocked, so one that arrives between the fork and
        # ignore_sigterm cannot kill them; the main process gets it when the workers are up.
        with _sigterm_blocked():
            it = super().__iter__()
        if self.num_workers > 0:
            _LIVE_ITERATORS.add(it)
        return it


atexit.register(_kill_workers_at_exit)


def make_loader(ds, sampler, cfg: TrainConfig, device: torch.device, *, seed: int,
                drop_last: bool):
    """A :class:`Loader` over ``ds`` in ``sampler``'s order, with ``cfg``'s batch size and
    workers (no more than the cores); ``seed`` seeds the workers' generators."""
    kw: dict[str, Any] = {}
    # More workers than cores only adds switching (and a warning from PyTorch).
    workers = min(cfg.workers, os.cpu_count() or 1)
    if workers > 0:
        kw.update(prefetch_factor=4 if device.type == "cuda" else 2,
                  worker_init_fn=ignore_sigterm)
    return Loader(
        ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
        collate_fn=collate_skip_bad, pin_memory=device.type == "cuda", drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed), **kw)

"""Training: one epoch, the evaluation pass, a run (``fit``) and ``resume``.

One process, or torchrun with DistributedDataParallel. A run is built in phases (data,
model, optimisation), then trained epoch by epoch: train, validate, record. Its progress
lives in a :class:`RunState` that goes into every checkpoint and comes back out on resume.

    fitting.py    fit and resume: a run from start to end (TrainResult), and the threshold
                  chosen on validation at its end
    epochs.py     one epoch of a run: train, validate over every rank, record (checkpoints,
                  progress line); RunState, how far a run has got
    budget.py     the time budget: timing the first steps, planning and re-planning epochs
    setup.py      building a run from a TrainConfig: Run, its data, model and optimisation
    loop.py       train_one_epoch and evaluate, on plain arguments (model, loader, device...)
    processes.py  the process group, random generators, SIGTERM, DataLoader worker processes

Each imports only the ones below it in this list.
"""

from ..checkpoint import CheckpointError, amp_dtype
from .budget import epoch_costs, fitting_epochs, time_steps
from .epochs import RunState, epoch_line, validate_epoch
from .fitting import TrainResult, fit, resume
from .loop import EpochState, TrainingError, evaluate, mixup_draw, train_one_epoch
from .processes import DistInfo, Terminated
from .setup import Optimisation, Run, WarmupCosine, build_optimisation, build_run

__all__ = [
    "CheckpointError", "DistInfo", "EpochState", "Optimisation", "Run", "RunState",
    "Terminated", "TrainResult", "TrainingError", "WarmupCosine", "amp_dtype",
    "build_optimisation", "build_run", "epoch_costs", "epoch_line", "evaluate", "fit",
    "fitting_epochs", "mixup_draw", "resume", "time_steps", "train_one_epoch",
    "validate_epoch",
]

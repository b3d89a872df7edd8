"""The record of one evaluation: what ``metrics.json`` holds and ``report.md`` is written from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from . import __version__
from .errors import UserError
from .files import jsonable


@dataclass
class CheckpointSummary:
    """Which checkpoint an evaluation ran, as ``metrics.json`` records it."""

    path: str
    arch: str
    epoch: int
    best_epoch: int
    split_hash: str | None
    training_metrics: dict[str, float]
    """The checkpoint's validation metrics of its best epoch."""


@dataclass
class EvaluationResult:
    """Every number and fact of one evaluation; ``metrics.json`` is :meth:`to_json`.

    The metric sections (``image``, ``patient``, ``calibration``) are the dicts of
    :func:`bcd.metrics.evaluate_predictions`; ``ci`` holds ``[low, high]`` per metric in the
    same nesting.
    """

    subset: str
    checkpoint: CheckpointSummary
    data: str
    split: str
    """Where the evaluated table came from, in words."""
    split_hash: str | None
    same_split_as_training: bool | None
    tta: bool
    protocol: str
    leakage: list[str]
    allow_leakage: bool
    notes: list[str]
    caveats: list[str]
    threshold: dict[str, Any]
    """``value``, ``method``, ``chosen_on``, ``source``... (see
    :func:`bcd.thresholds.decide_threshold`)."""
    counts: dict[str, Any]
    bootstrap: dict[str, Any]
    image: dict[str, Any]
    patient: dict[str, Any]
    calibration: dict[str, Any]
    ci: dict[str, Any]
    by_magnification: dict[str, Any]
    by_subtype: dict[str, Any]
    split_counts: list[dict[str, Any]]
    config: dict[str, Any]
    files: list[str] = field(default_factory=list)
    created: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    bcd_version: str = __version__

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values: NaN as null, numpy values as Python ones."""
        return jsonable(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EvaluationResult:
        """Reads :meth:`to_json` output (``metrics.json``)."""
        from .config import dataclass_from_dict

        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["checkpoint"] = dataclass_from_dict(CheckpointSummary, d.get("checkpoint") or {},
                                              UserError)
        return dataclass_from_dict(cls, d, UserError)


@dataclass
class Evaluation:
    """What :func:`evaluate_checkpoint` found and wrote."""

    out_dir: Path
    metrics: EvaluationResult
    predictions: pd.DataFrame

    @property
    def leakage(self) -> list[str]:
        """One sentence per kind of overlap with the checkpoint's training data; empty if none."""
        return self.metrics.leakage

    @property
    def leaked(self) -> bool:
        return bool(self.metrics.leakage)

    @property
    def report(self) -> Path:
        return self.out_dir / "report.md"

"""The patient-disjoint k-fold protocol: ``run_cv`` trains and evaluates every fold and
summarises them (mean +- std per fold, and out-of-fold predictions pooled)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .data.breakhis import CLASSES, build_index
from .data.splits import write_split
from .errors import UserError
from .evaluation import evaluate_checkpoint
from .files import atomic_write_text, jsonable
from .metrics import bootstrap_metrics, group_sort_key, pooled_metrics, scalar_metrics
from .report import cv_report_md
from .results import Evaluation


@dataclass
class CVResult:
    """What :func:`run_cv` wrote: per-fold evaluations and the mean +- std summary."""

    out_dir: Path
    folds: list[Evaluation]
    summary: pd.DataFrame
    """One row per (scope, metric): ``mean``, ``std`` (sample, ddof=1) and ``folds``."""
    pooled: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Out-of-fold predictions pooled (each at its fold's threshold): ``image_roc_auc``,
    ``image_accuracy``, ``patient_roc_auc``, ``patient_accuracy``..., each ``{"value",
    "ci"}`` with a patient-bootstrap 95% interval."""


def _fold_done(run: Path, cfg) -> bool:
    """Whether ``run`` holds this fold trained to the end with these very settings.

    With a time budget the run's own ``config.yaml`` holds the epochs the budget allowed
    (each fold its own), so ``epochs`` is left out of the comparison and the end is the run's.
    """
    from .checkpoint import load_checkpoint
    from .config import load_config

    if not (run / "config.yaml").is_file():
        return False
    saved = load_config(run / "config.yaml")
    mine, theirs = cfg.to_dict(), saved.to_dict()
    if cfg.time_budget:
        mine.pop("epochs")
        theirs.pop("epochs")
    if mine != theirs:
        raise UserError(f"{run} holds a run with other settings than this cv; pass another "
                        "--out, or delete that folder to retrain it.")
    if not (run / "best.pt").is_file() or not (run / "last.pt").is_file():
        return False
    return load_checkpoint(run / "last.pt").epoch >= saved.epochs


def run_cv(data: str | Path, *, folds: int = 5, settings: dict[str, Any] | None = None,
           out: str | Path, bootstrap: int = 1000, target_sensitivity: float | None = None,
           progress: bool = True) -> CVResult:
    """The patient-disjoint k-fold protocol end to end.

    Patients are dealt into ``folds`` class-stratified folds. For fold k, fold k is test,
    fold k+1 validation (it picks the best epoch and the threshold) and the rest train; the
    fold's model is trained into ``out/runs/fold-k`` and evaluated on its test fold into
    ``out/fold-k``. A fold already trained to the end is reused; one cut short is resumed.

    Args:
        data: The data folder.
        folds: Number of folds (at least 3: train, validation and test folds).
        settings: Training settings (a preset merged with options, as for ``bcd train``);
            ``data``, ``split``, ``runs_dir`` and ``name`` are set here.
        out: The output folder.
        bootstrap: Resamples for each fold's intervals (0 leaves them out).
        target_sensitivity: As for :func:`evaluate_checkpoint`.
        progress: Progress bars.

    Returns:
        The :class:`CVResult`; ``cv_summary.csv``, ``cv_summary.json`` (with the pooled
        out-of-fold figures), ``cv_folds.csv``, ``oof_predictions.csv`` and ``report.md`` are
        in ``out``.
    """
    from .config import TrainConfig
    from .data.splits import make_folds

    if folds < 3:
        raise UserError(f"--folds {folds}: the protocol needs at least 3 folds (one test, one "
                        "validation, the rest training).")
    settings = dict(settings or {})
    for key in ("split", "runs_dir", "name"):
        settings.pop(key, None)
    base = TrainConfig.from_dict({**settings, "data": str(data)})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index = build_index(data, group_by=base.group_by)
    table = make_folds(index, folds=folds, seed=base.seed, magnification=base.magnification)
    write_split(table, out / "folds.csv")
    evaluations, long_rows, per_fold = [], [], []
    for k in range(folds):
        ev = _run_fold(k, table, base, data, out, bootstrap=bootstrap,
                       target_sensitivity=target_sensitivity, progress=progress)
        evaluations.append(ev)
        long_rows += _fold_metric_rows(k, ev)
        per_fold.append(_fold_row(k, ev))
    summary, as_json = _write_summaries(pd.DataFrame(long_rows), per_fold, folds, base, out)
    as_json.update(_write_out_of_fold(evaluations, out, bootstrap, base.seed))
    atomic_write_text(out / "cv_summary.json", json.dumps(jsonable(as_json), indent=2) + "\n")
    atomic_write_text(out / "report.md", cv_report_md(as_json, summary, base))
    return CVResult(out, evaluations, summary, as_json["pooled"])


def _run_fold(k: int, table: pd.DataFrame, base, data: str | Path, out: Path, *,
              bootstrap: int, target_sensitivity: float | None, progress: bool) -> Evaluation:
    """Fold ``k``: writes its split, trains its model into ``out/runs/fold-k`` (reused when
    already trained to the end, resumed when cut short) and evaluates it on its test fold
    into ``out/fold-k``."""
    from .config import TrainConfig
    from .data.splits import fold_split
    from .engine import fit, resume

    split_path = write_split(fold_split(table, k), out / "splits" / f"fold-{k}.csv")
    cfg = TrainConfig.from_dict({**base.to_dict(), "split": str(split_path),
                                 "runs_dir": str(out / "runs"), "name": f"fold-{k}"})
    run = out / "runs" / f"fold-{k}"
    if _fold_done(run, cfg):
        print(f"fold {k}: already trained, reusing {run / 'best.pt'}")
    elif (run / "last.pt").is_file():
        resume(run, progress=progress)
    else:
        fit(cfg, progress=progress)
    ev = evaluate_checkpoint(run / "best.pt", data, split=split_path, subset="test",
                             out=out / f"fold-{k}", bootstrap=bootstrap,
                             target_sensitivity=target_sensitivity, device=cfg.device,
                             batch_size=cfg.batch_size, progress=progress)
    if ev.leaked:  # cannot happen with make_folds; guard against a changed data folder
        raise UserError(f"fold {k}: " + " ".join(ev.leakage))
    return ev


def _fold_metric_rows(k: int, ev: Evaluation) -> list[dict[str, Any]]:
    """Fold ``k``'s scalar metrics, one row per (scope, metric): overall (``all``) and per
    magnification."""
    m = ev.metrics
    scopes = {"all": {"image": m.image, "patient": m.patient, "calibration": m.calibration},
              **m.by_magnification}
    rows = []
    for scope, section in scopes.items():
        flat = scalar_metrics({s: section[s] for s in ("image", "patient", "calibration")})
        rows += [{"fold": k, "scope": scope, "metric": name, "value": v}
                 for name, v in flat.items()]
    return rows


def _fold_row(k: int, ev: Evaluation) -> dict[str, Any]:
    """Fold ``k``'s line in the summary's ``per_fold``: its test set, threshold, best epoch
    and headline figures."""
    m = ev.metrics
    return {"fold": k, "test_images": m.counts["images"],
            "test_patients": m.counts["patients"],
            "threshold": m.threshold["value"],
            "best_epoch": m.checkpoint.best_epoch,
            "accuracy": m.image["accuracy"], "roc_auc": m.image["roc_auc"],
            "recognition_rate": m.patient.get("recognition_rate")}


def _write_summaries(long: pd.DataFrame, per_fold: list[dict[str, Any]], folds: int, base,
                     out: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Writes ``cv_folds.csv`` and ``cv_summary.csv``; returns the summary (mean +- std per
    scope and metric) and its JSON form (``overall``, ``by_magnification``, ``per_fold``)."""
    scopes = ["all"] + sorted(set(long["scope"]) - {"all"}, key=group_sort_key)
    long = long.sort_values("scope", key=lambda c: c.map(scopes.index), kind="stable")
    long.to_csv(out / "cv_folds.csv", index=False)
    summary = (long.groupby(["scope", "metric"], sort=False)["value"]
               .agg(mean="mean", std="std", folds="count").reset_index())
    summary.to_csv(out / "cv_summary.csv", index=False)
    as_json = {"folds": folds, "seed": base.seed, "settings": base.to_dict(),
               "per_fold": per_fold, "overall": {}, "by_magnification": {}}
    for (scope, metric), g in long.groupby(["scope", "metric"], sort=False):
        entry = {"mean": g["value"].mean(), "std": g["value"].std(),
                 "folds": int(g["value"].notna().sum()), "values": g["value"].tolist()}
        target = as_json["overall"] if scope == "all" else as_json["by_magnification"].setdefault(
            scope, {})
        target[metric] = entry
    return summary, as_json


def _out_of_fold(evaluations: list[Evaluation]) -> pd.DataFrame:
    """Every fold's test predictions in one table, with the fold and its threshold."""
    frames = []
    for k, ev in enumerate(evaluations):
        pred = ev.predictions
        frames.append(pred.assign(fold=k, threshold=float(ev.metrics.threshold["value"]),
                                  target=(pred["label"] == CLASSES[1]).astype(int)))
    return pd.concat(frames, ignore_index=True)


def _write_out_of_fold(evaluations: list[Evaluation], out: Path, bootstrap: int,
                       seed: int) -> dict[str, Any]:
    """Writes ``oof_predictions.csv``; returns the pooled figures, overall (``pooled``) and
    per magnification (``pooled_by_magnification``)."""
    oof = _out_of_fold(evaluations)
    oof.to_csv(out / "oof_predictions.csv", index=False)
    mags = sorted(set(oof["magnification"].astype(str)) - {""}, key=group_sort_key)
    return {"pooled": _pooled(oof, bootstrap, seed),
            "pooled_by_magnification": {
                mag: _pooled(oof[oof["magnification"] == mag], bootstrap, seed) for mag in mags}}


def _pooled(oof: pd.DataFrame, bootstrap: int, seed: int) -> dict[str, dict[str, Any]]:
    """Pooled out-of-fold figures, each with its patient-bootstrap 95% interval."""
    if oof.empty:
        return {}
    values = pooled_metrics(oof)
    ci = bootstrap_metrics(oof, pooled_metrics, n=bootstrap, seed=seed) if bootstrap else {}
    return {name: {"value": v, "ci": list(ci[name]) if name in ci else None}
            for name, v in values.items()}

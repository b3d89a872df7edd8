"""Evaluating a checkpoint on one subset of a split.

``evaluate_checkpoint`` runs a checkpoint over a subset, chooses the decision threshold on the
split's validation subset (and stores it in the checkpoint), computes image- and patient-level
metrics with patient-bootstrap intervals, checks for patient leakage, and writes
``metrics.json``, ``predictions.csv``, PNG plots and ``report.md``. The k-fold protocol
that calls it for every fold is :mod:`.cv`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .checkpoint import Checkpoint
from .data.breakhis import CLASSES, build_index
from .data.splits import (
    SUBSETS,
    find_leakage,
    list_ids,
    load_split,
    split_hash,
)
from .errors import UserError
from .files import atomic_write_text
from .metrics import (
    bootstrap_metrics,
    evaluate_predictions,
    metrics_by,
    patient_table,
    scalar_metrics,
)
from .report import evaluation_report_md
from .results import CheckpointSummary, Evaluation, EvaluationResult
from .thresholds import decide_threshold
from .thresholds import store_threshold as write_threshold

PREDICTION_COLUMNS = ["path", "patient", "magnification", "label", "probability", "prediction"]
PLOT_FILES = ("roc.png", "pr.png", "confusion.png", "reliability.png", "per_magnification.png")
LEAKAGE_EXIT_CODE = 3
"""`bcd evaluate` exit code when the evaluated images overlap the checkpoint's training data."""

# ----------------------------------------------------------------------------- inputs


def _run_split_path(checkpoint: Path) -> Path:
    return checkpoint.parent / "split.csv"


def _resolve_table(checkpoint: Path, root: Path, split: str | Path | None,
                   group_by: str, external: bool = False
                   ) -> tuple[pd.DataFrame, str, list[str]]:
    """The table to evaluate from: a split file, the run's split.csv, or ROOT indexed.

    ``external``: ROOT is not the data the checkpoint was trained on; every image under it is
    evaluated as one subset, ``all`` (external validation).
    """
    if split is not None:
        table, source = load_split(split), f"split file `{split}`"
    elif external:
        note = (f"External validation: {root} is not the data folder the checkpoint was trained "
                "on, so EVERY image under it is evaluated as one subset, 'all', at the "
                "threshold stored in the checkpoint.")
        return (build_index(root, group_by=group_by).assign(split="all"),
                f"every image under `{root}` (external)", [note])
    elif _run_split_path(checkpoint).is_file():
        table = load_split(_run_split_path(checkpoint))
        source = f"the run's own split `{_run_split_path(checkpoint)}`"
    else:
        index = build_index(root, group_by=group_by)
        if index["split"].ne("").all():
            note = (f"No --split was given and there is no split.csv next to {checkpoint}: "
                    f"{root} was indexed and its own train/val/test folders are the subsets.")
            return index, f"the folders of `{root}`", [note]
        note = (f"No --split was given and there is no split.csv next to {checkpoint}: EVERY "
                f"image under {root} was indexed and is evaluated as one subset, 'all'. Pass "
                "--split runs/NAME/split.csv --subset test to evaluate held-out patients only.")
        return index.assign(split="all"), f"every image under `{root}`", [note]
    if table["split"].eq("").all():
        raise UserError(f"{split or _run_split_path(checkpoint)} holds folds but no subsets; "
                        "turn fold k into train/val/test with `bcd cv`, or bcd.fold_split.")
    return table, source, []


def _is_registered(checkpoint: Path) -> bool:
    from .pretrained import is_registered_file

    return is_registered_file(checkpoint)


def _is_other_data(checkpoint: Path, root: Path, sample: int = 50) -> bool:
    """Whether ``root`` holds none of the images of the checkpoint's own split (external
    data), as opposed to holding them, perhaps moved or copied elsewhere, some perhaps missing
    (those are reported as unreadable)."""
    if not _run_split_path(checkpoint).is_file():
        return False
    paths = load_split(_run_split_path(checkpoint))["path"]
    step = max(1, len(paths) // sample)
    return not any((root / p).is_file() for p in paths.iloc[::step])


def _train_paths(checkpoint: Path, ckpt: Checkpoint,
                 table: pd.DataFrame) -> tuple[set[str], set[str]] | None:
    """Training and validation image paths of the checkpoint's own run, when known for sure.

    Known when the split being evaluated, or the ``split.csv`` next to the checkpoint, hashes
    to the checkpoint's ``split_hash``.
    """
    candidates = [table]
    if _run_split_path(checkpoint).is_file():
        candidates.append(load_split(_run_split_path(checkpoint)))
    for run in candidates:
        if set(run["split"]) <= set(SUBSETS) and split_hash(run) == ckpt.split_hash:
            return (set(run.loc[run["split"] == "train", "path"]),
                    set(run.loc[run["split"] == "val", "path"]))
    return None


# ----------------------------------------------------------------------------- evaluate


def _split_counts(table: pd.DataFrame) -> list[dict[str, Any]]:
    rows = []
    order = [s for s in (*SUBSETS, "all") if s in set(table["split"])]
    for name in order:
        part = table[table["split"] == name]
        has = part["patient"].ne("").all()
        per = part.groupby("patient")["target"].max() if has else None
        rows.append({"subset": name, "images": len(part),
                     "patients": int(len(per)) if has else None,
                     "benign_images": int((part["target"] == 0).sum()),
                     "malignant_images": int((part["target"] == 1).sum()),
                     "malignant_patients": int(per.sum()) if has else None})
    return rows


def _nest(flat: dict[str, tuple[float, float]]) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    for name, (low, high) in flat.items():
        section, key = name.split(".", 1)
        out.setdefault(section, {})[key] = [low, high]
    return out


def _default_out(checkpoint: Path, subset: str) -> Path:
    name = checkpoint.parent.name if checkpoint.name in ("best.pt", "last.pt") else checkpoint.stem
    return Path("reports") / f"{name}-{subset}"


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path | None = None, *,
                        split: str | Path | None = None, subset: str | None = None,
                        out: str | Path | None = None, target_sensitivity: float | None = None,
                        bootstrap: int = 1000, seed: int = 0, alpha: float = 0.05,
                        allow_leakage: bool = False, store_threshold: bool = True,
                        device: str = "auto", batch_size: int = 64, workers: int = 0,
                        progress: bool = True, tta: bool = False) -> Evaluation:
    """Evaluates a checkpoint on one subset and writes the report folder.

    Args:
        checkpoint: A ``best.pt``/``last.pt`` written by ``bcd train``.
        data: The data folder the split's paths are relative to; None uses the one in the
            checkpoint's config.
        split: A split CSV; None uses ``split.csv`` next to the checkpoint, or else indexes
            ``data`` and evaluates everything (said in the report).
        subset: The subset to evaluate (``val`` gives optimistic numbers); None: ``test``,
            or ``all`` where every image is evaluated as one subset (external data, or a
            folder without subsets), which only None or ``all`` accept.
        out: The report folder; None gives ``reports/<run name>-<subset>``.
        target_sensitivity: Choose the threshold for this sensitivity instead of Youden's J.
        bootstrap: Resamples for the intervals (0 leaves them out).
        seed: Seed of the bootstrap.
        alpha: 0.05 gives 95% intervals.
        allow_leakage: Only recorded in the report; the caller decides the exit code.
        store_threshold: Write the threshold chosen on val into the checkpoint.
        device: Where the model runs.
        batch_size: Images per forward pass.
        workers: DataLoader workers.
        progress: Show a progress bar.
        tta: Average each image's prediction over its 8 flips/rotations.

    Returns:
        The :class:`Evaluation`; ``leaked`` is true when the evaluated images overlap the
        checkpoint's training (or, for a test subset, validation) data.

    Raises:
        UserError: a missing data folder or subset, or no readable image to evaluate.
    """
    from .checkpoint import load_checkpoint

    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)  # once: the predictor and the checks share it
    root = _data_root(checkpoint, ckpt, data)
    external = data is not None and split is None and _is_other_data(checkpoint, root)
    table, source, notes = _resolve_table(checkpoint, root, split, ckpt.group_by, external)
    subset = _choose_subset(table, subset, source, root)
    out_dir = Path(out) if out is not None else _default_out(checkpoint, subset)
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluated = table[table["split"] == subset].reset_index(drop=True)
    val = table[table["split"] == "val"].reset_index(drop=True)
    leakage, val_leak = _check_leakage(checkpoint, ckpt, table, evaluated, val, subset, notes,
                                       external)
    has_patients = bool(evaluated["patient"].ne("").all())
    ev_pred, val_pred, bad = _predict_subsets(ckpt, root, evaluated, val, subset, device=device,
                                              batch_size=batch_size, workers=workers,
                                              progress=progress, tta=tta)

    this_hash = split_hash(table) if "all" not in set(table["split"]) else None
    threshold, threshold_info, caveats = decide_threshold(
        ckpt, val_pred, target_sensitivity, val_leak, this_hash, tta=tta, evaluated=ev_pred)
    caveats = _subset_caveats(subset, threshold_info) + caveats
    caveats += _store_chosen_threshold(checkpoint, threshold, threshold_info,
                                       store=store_threshold, val_leak=val_leak)
    caveats += _reading_caveats(bad, subset, has_patients)
    result = _evaluation_result(
        checkpoint, ckpt, table, ev_pred, subset=subset, root=root, source=source,
        this_hash=this_hash, threshold=threshold, threshold_info=threshold_info, bad=bad,
        has_patients=has_patients, leakage=leakage, allow_leakage=allow_leakage, notes=notes,
        caveats=caveats, bootstrap=bootstrap, seed=seed, alpha=alpha, tta=tta)
    preds = _write_outputs(result, ev_pred, threshold, out_dir)
    return Evaluation(out_dir, result, preds)


def _choose_subset(table: pd.DataFrame, subset: str | None, source: str, root: Path) -> str:
    """The subset to evaluate: ``all`` where the table is one subset (which only None or
    ``all`` accept), else ``subset`` or ``test``; a subset the table lacks is a UserError."""
    if (table["split"] == "all").all():
        if subset not in (None, "all"):
            raise UserError(
                f"{source} is evaluated as one subset, 'all': it has no '{subset}' subset. Drop "
                f"--subset (or pass --subset all); to evaluate one of its folders alone, give "
                f"that folder as --data (e.g. {root / 'valid'} when it has one).")
        subset = "all"
    subset = subset or "test"
    available = [s for s in (*SUBSETS, "all") if s in set(table["split"])]
    if subset not in available:
        raise UserError(f"{source} has no '{subset}' subset; it has "
                        f"{', '.join(available)}. Pass --subset with one of those.")
    return subset


def _predict_subsets(ckpt: Checkpoint, root: Path, evaluated: pd.DataFrame, val: pd.DataFrame,
                     subset: str, *, device: str, batch_size: int, workers: int,
                     progress: bool, tta: bool
                     ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Predictions for the evaluated and the val images; returns ``(evaluated, val, unreadable)``
    (the readable ones of each subset, and the rows that could not be read).

    Raises:
        UserError: no evaluated image could be read.
    """
    from .inference import Predictor

    # One pass over the images of both subsets.
    predictor = Predictor.from_loaded(ckpt, device=device)
    wanted = evaluated if subset == "val" else pd.concat([evaluated, val], ignore_index=True)
    predicted = predictor.predict_table(root, wanted, batch_size=batch_size, workers=workers,
                                        progress=progress, tta=tta)
    bad = predicted[predicted["error"] != ""]
    predicted = predicted[predicted["error"] == ""]
    ev_pred = predicted[predicted["split"] == subset].reset_index(drop=True)
    val_pred = predicted[predicted["split"] == "val"].reset_index(drop=True)
    if ev_pred.empty:
        raise UserError(f"none of the {len(evaluated)} '{subset}' images under {root} could be "
                        "read; check --data (the split's paths are relative to it).")
    return ev_pred, val_pred, bad


def _store_chosen_threshold(checkpoint: Path, threshold: float, threshold_info: dict, *,
                            store: bool, val_leak: list[str]) -> list[str]:
    """Stores a threshold chosen on val just now in the checkpoint (when ``store``, the val
    subset does not leak and the checkpoint is not a registered model, which is left as it
    is); records where in ``threshold_info``. Returns the caveats."""
    caveats = []
    chosen_now = threshold_info.get("source") == "chosen on val now"
    if store and chosen_now and _is_registered(checkpoint):
        store = False
        caveats.append(f"{checkpoint} is a registered trained model, whose SHA-256 is checked "
                       "before use: the threshold was not stored in it (evaluate a copy to "
                       "store one).")
    if chosen_now and store and not val_leak:
        try:
            write_threshold(checkpoint, threshold, threshold_info)
            threshold_info["stored_in"] = str(checkpoint)
        except (OSError, UserError) as e:
            caveats.append(f"The threshold could not be stored in {checkpoint} ({e}).")
    return caveats


def _reading_caveats(bad: pd.DataFrame, subset: str, has_patients: bool) -> list[str]:
    """Caveats on the images read: those left out unreadable, and data without patient ids."""
    caveats = []
    if len(bad):
        caveats.append(f"{len(bad)} image(s) of the {subset}"
                       + ("" if subset == "val" else " and val") + " subsets could not be "
                       f"read and were left out: {list_ids(bad['path'], 3)}.")
    if not has_patients:
        caveats.append("The data has no patient ids: the bootstrap resamples images, as if "
                       "every image came from a different patient. If several images come from "
                       "one patient the intervals are too narrow, and the split itself may put "
                       "one patient's images on both sides (an image-level split: expect "
                       "optimistic accuracy compared with a patient-disjoint evaluation).")
    return caveats


def _evaluation_result(checkpoint: Path, ckpt: Checkpoint, table: pd.DataFrame,
                       ev_pred: pd.DataFrame, *, subset: str, root: Path, source: str,
                       this_hash: str | None, threshold: float, threshold_info: dict,
                       bad: pd.DataFrame, has_patients: bool, leakage: list[str],
                       allow_leakage: bool, notes: list[str], caveats: list[str],
                       bootstrap: int, seed: int, alpha: float, tta: bool) -> EvaluationResult:
    """The metrics of ``ev_pred`` at ``threshold`` with their bootstrap intervals, and what
    was evaluated how, as one :class:`EvaluationResult`."""
    metrics, by_mag, by_subtype, ci = _metrics_with_ci(ev_pred, threshold, bootstrap, seed,
                                                       alpha)
    units = int(ev_pred["patient"].nunique()) if has_patients else len(ev_pred)
    return EvaluationResult(
        subset=subset,
        checkpoint=CheckpointSummary(str(checkpoint), ckpt.arch, ckpt.epoch, ckpt.best_epoch,
                                     ckpt.split_hash, ckpt.metrics),
        data=str(root), split=source, split_hash=this_hash,
        same_split_as_training=(this_hash == ckpt.split_hash) if this_hash else None,
        tta=tta, protocol=_protocol(has_patients, leakage), leakage=leakage,
        allow_leakage=allow_leakage, notes=notes, caveats=caveats, threshold=threshold_info,
        counts={"images": len(ev_pred), "patients": units if has_patients else None,
                "unreadable": bad["path"].tolist()},
        bootstrap={"n": bootstrap, "seed": seed, "alpha": alpha,
                   "unit": "patient" if has_patients else "image", "units": units},
        image=metrics["image"], patient=metrics["patient"],
        calibration=metrics["calibration"], ci=ci, by_magnification=by_mag,
        by_subtype=by_subtype, split_counts=_split_counts(table), config=ckpt.config)


def _data_root(checkpoint: Path, ckpt: Checkpoint, data: str | Path | None) -> Path:
    root = Path(data) if data is not None else (Path(ckpt.data) if ckpt.data else None)
    if root is None:
        raise UserError(f"{checkpoint} does not say where its data is; pass --data ROOT.")
    if not root.is_dir():
        raise UserError(f"{root}: no such data folder. Pass --data with the folder the split's "
                        "paths are relative to (the one the model was trained with).")
    return root


def _check_leakage(checkpoint: Path, ckpt: Checkpoint, table: pd.DataFrame,
                   evaluated: pd.DataFrame, val: pd.DataFrame, subset: str,
                   notes: list[str], external: bool = False) -> tuple[list[str], list[str]]:
    """Overlap of the evaluated (and the val) images with the checkpoint's training data.

    Appends to ``notes`` what could not be checked. Returns ``(leakage, val_leak)``. Paths of
    another data folder say nothing about the training images, so they are not compared.
    """
    run_paths = None if external else _train_paths(checkpoint, ckpt, table)
    leakage = find_leakage(ckpt.split_patients, evaluated, subset, run_paths)
    # Only training overlap matters for the val subset: it is meant to be the run's own val.
    val_leak = [] if subset == "val" else find_leakage(ckpt.split_patients, val, "val",
                                                       run_paths)
    has_patients = bool(evaluated["patient"].ne("").all())
    if not ckpt.split_patients and has_patients:
        notes.append("The checkpoint records no training patients: leakage could not be "
                     "checked by patient.")
    if not has_patients and run_paths is None:
        notes.append("No patient ids, and neither this split nor a split.csv next to the "
                     "checkpoint is the one it was trained with: leakage could not be checked.")
    elif not has_patients:
        notes.append("No patient ids: leakage was checked by image path against the training "
                     "split (the same image in two subsets), which cannot catch two images of "
                     "one patient.")
    return leakage, val_leak


def _subset_caveats(subset: str, threshold_info: dict) -> list[str]:
    if subset == "val" and threshold_info.get("chosen_on") == "val":
        return ["The threshold was chosen on the same subset it is evaluated on (val): "
                "accuracy, sensitivity, specificity, precision and F1 are optimistic. AUC, PR "
                "AUC, ECE and Brier do not depend on the threshold (though val also picked the "
                "best epoch, so they lean optimistic too). Evaluate a held-out test subset for "
                "unbiased numbers."]
    if subset == "val":
        return ["This is the validation subset, which picked the best epoch: every number "
                "leans optimistic. Evaluate a held-out test subset."]
    return []


def _metrics_with_ci(ev_pred: pd.DataFrame, threshold: float, bootstrap: int, seed: int,
                     alpha: float) -> tuple[dict, dict, dict, dict]:
    """Metrics overall, by magnification and by subtype, and bootstrap intervals."""
    metrics = evaluate_predictions(ev_pred, threshold)
    by_mag = metrics_by(ev_pred, "magnification", threshold)
    by_subtype = metrics_by(ev_pred, "subtype", threshold)
    ci: dict = {}
    if bootstrap:
        def fn(d):
            return scalar_metrics(evaluate_predictions(d, threshold))

        ci = _nest(bootstrap_metrics(ev_pred, fn, n=bootstrap, seed=seed, alpha=alpha))
        if len(by_mag) > 1:
            for mag in by_mag:
                part = ev_pred[ev_pred["magnification"] == mag]
                by_mag[mag]["ci"] = _nest(bootstrap_metrics(part, fn, n=bootstrap, seed=seed,
                                                            alpha=alpha))
        elif by_mag:
            by_mag[next(iter(by_mag))]["ci"] = ci
    return metrics, by_mag, by_subtype, ci


def _write_outputs(result: EvaluationResult, ev_pred: pd.DataFrame, threshold: float,
                   out_dir: Path) -> pd.DataFrame:
    """``predictions.csv``, the plots, ``metrics.json`` and ``report.md``; returns the table."""
    preds = ev_pred.assign(prediction=np.where(ev_pred["probability"] >= threshold,
                                               CLASSES[1], CLASSES[0]))
    for c in PREDICTION_COLUMNS:
        if c not in preds.columns:
            preds[c] = ""
    preds = preds[PREDICTION_COLUMNS]
    preds.to_csv(out_dir / "predictions.csv", index=False)
    _write_plots(result, ev_pred, threshold, out_dir)
    result.files = sorted(f.name for f in out_dir.iterdir()
                          if f.name in PLOT_FILES or f.name == "predictions.csv") + [
        "metrics.json", "report.md"]
    atomic_write_text(out_dir / "metrics.json",
                      json.dumps(result.to_json(), indent=2) + "\n")
    atomic_write_text(out_dir / "report.md", evaluation_report_md(result))
    return preds


def _write_plots(result: EvaluationResult, ev_pred: pd.DataFrame, threshold: float,
                 out_dir: Path) -> None:
    from . import plots

    subset, has_patients = result.subset, result.counts["patients"] is not None
    y, p = ev_pred["target"].to_numpy(), ev_pred["probability"].to_numpy()
    what = f"{subset} subset, {len(ev_pred)} images" + (
        f", {result.counts['patients']} patients" if has_patients else "")
    per_patient = None
    if has_patients:
        per = patient_table(y, p, ev_pred["patient"].to_numpy(), threshold)
        per_patient = (per["target"].to_numpy(), per["mean_probability"].to_numpy())
    save = plots.save_figure
    save(plots.plot_roc(y, p, threshold=threshold, patient_curve=per_patient,
                        title=f"ROC ({what})"), out_dir / "roc.png")
    save(plots.plot_pr(y, p, threshold=threshold, title=f"Precision-recall ({what})"),
         out_dir / "pr.png")
    save(plots.plot_confusion(result.image["confusion_matrix"],
                              title=f"Confusion matrix, images ({subset}, threshold "
                              f"{threshold:.3g})"), out_dir / "confusion.png")
    cal = result.calibration
    save(plots.plot_reliability(cal["reliability"], ece=cal["ece"], brier=cal["brier"],
                                title=f"Reliability ({subset})"), out_dir / "reliability.png")
    stale = out_dir / "per_magnification.png"
    by_mag = result.by_magnification
    if by_mag:
        save(plots.plot_per_magnification(by_mag,
                                          ci={m: v.get("ci", {}) for m, v in by_mag.items()},
                                          title=f"By magnification ({subset}, threshold "
                                          f"{threshold:.3g})"), stale)
    elif stale.exists():
        stale.unlink()  # left by an earlier evaluation into the same folder


def _protocol(has_patients: bool, leakage: list[str]) -> str:
    if leakage:
        return ("LEAKED: the evaluated images overlap the data the model was trained or "
                "selected on; not a held-out estimate.")
    if has_patients:
        return ("patient-disjoint: no evaluated patient was in the checkpoint's training (or "
                "validation) subset. Expect lower numbers than papers that split BreakHis by "
                "image (97-99% there vs 85-95% patient-disjoint).")
    return ("image-level: the data has no patient ids, so nothing here can check that images "
            "of one patient are not on both sides of the split (only the data set's own "
            "split could guarantee it); numbers may be optimistic.")



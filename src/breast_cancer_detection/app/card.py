"""The model card: what the model is, what it was trained and tested on, and what it is for;
with the evaluation report of ``bcd evaluate`` when one is given, and without local paths."""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np

from .. import __version__
from ..errors import UserError
from ..files import jsonable
from ..inference import DEFAULT_TILE_FACTOR, Predictor
from ..results import EvaluationResult

_ABSOLUTE = re.compile(r"^(~|/|file:|[A-Za-z]:[\\/]|\\\\|\.\.?[\\/])")  # and ./ ../


def without_local_paths(x: Any) -> Any:
    """``x`` with every absolute local path (or one relative to ``.`` or ``..``) replaced by
    its last part.

    The model card records where the model was trained (data folder, split file); over the
    network that tells strangers this machine's user names and folder layout.
    """
    if isinstance(x, dict):
        return {k: without_local_paths(v) for k, v in x.items()}
    if isinstance(x, list):
        return [without_local_paths(v) for v in x]
    if isinstance(x, str) and _ABSOLUTE.match(x):
        return PureWindowsPath(x.removeprefix("file:")).name or "(local path)"
    return x


def _serving_versions() -> dict[str, str]:
    """The versions of the packages that serve the model."""
    import fastapi
    import PIL
    import torch
    import torchvision

    return {"bcd": __version__, "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "fastapi": fastapi.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def read_report(path: str | Path) -> EvaluationResult:
    """Reads the ``metrics.json`` that ``bcd evaluate`` writes.

    Raises:
        UserError: missing file, or not a metrics.json of ``bcd evaluate``.
    """
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such report; pass the metrics.json written by "
                        "`bcd evaluate`.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a metrics.json from `bcd evaluate` ({e}).") from e
    if not isinstance(report, dict) or "image" not in report:
        raise UserError(f"{path}: not a metrics.json from `bcd evaluate` (no 'image' metrics).")
    try:
        return EvaluationResult.from_json(report)
    except (UserError, TypeError) as e:
        raise UserError(f"{path}: not a complete metrics.json from `bcd evaluate` ({e}).") from e


def _evaluation(report: EvaluationResult, predictor: Predictor) -> dict[str, Any]:
    """The part of an evaluation report that belongs on the card, checked against the model.

    Raises:
        UserError: the report is of a model trained on another split, or another architecture.
    """
    ckpt = predictor.checkpoint
    pairs = (("split", report.checkpoint.split_hash, ckpt.split_hash if ckpt else None),
             ("architecture", report.checkpoint.arch, predictor.arch))
    for what, theirs, ours in pairs:
        if theirs is not None and ours is not None and theirs != ours:
            raise UserError(f"the evaluation report is of another model (its {what} is "
                            f"{theirs}, the checkpoint's {ours}); pass the metrics.json that "
                            "`bcd evaluate` wrote for this checkpoint.")
    caveats = list(report.caveats)
    used = report.threshold.get("value")
    if used is not None and abs(float(used) - predictor.threshold) > 1e-6:
        caveats.append(f"These metrics were computed at threshold {float(used):.4f}; this "
                       f"server answers at {predictor.threshold:.4f}. Threshold-free metrics "
                       "(AUC, PR AUC) still apply.")
    alpha = report.bootstrap.get("alpha")
    return {
        "subset": report.subset,
        "images": report.counts.get("images"),
        "patients": report.counts.get("patients"),
        "image": report.image,
        "patient": report.patient,
        "calibration": report.calibration,
        "ci": report.ci,
        "ci_level": None if alpha is None else 1 - float(alpha),
        "bootstrap": report.bootstrap,
        "threshold": report.threshold,
        "same_split_as_training": report.same_split_as_training,
        "leakage": report.leakage,
        "protocol": report.protocol,
        "caveats": caveats,
        "created": report.created,
    }


def model_card(predictor: Predictor, report: EvaluationResult | None = None, *,
               scorer: Predictor | None = None) -> dict[str, Any]:
    """What the model is, what it was trained and tested on, and what it is for.

    Read from the checkpoint the predictor was loaded from; test-set metrics with confidence
    intervals come from ``report`` (a ``bcd evaluate`` metrics.json).

    Args:
        predictor: The loaded model.
        report: The evaluation report of this checkpoint, or None.
        scorer: The same model on the backend that scores the images, when that is not
            ``predictor`` (:meth:`Predictor.on_backend`).

    Returns:
        The card as plain JSON values (NaN as null).

    Raises:
        UserError: ``report`` is of another model.
    """
    ckpt = predictor.checkpoint
    cfg = ckpt.config if ckpt is not None else {}
    pre = predictor.pre
    # Counts of patients only where the data had patient ids (PCam has none: no zeros).
    patients = {subset: len(ids) for subset, ids in (ckpt.split_patients if ckpt else {}).items()
                if ids}
    evaluation = _evaluation(report, predictor) if report is not None else None
    tile = pre.resize or pre.size
    resize = (f"short side resized to {pre.resize} px, centre {pre.size} px crop"
              if pre.resize else f"resized to {pre.size} x {pre.size} px") + (
        f"; an image whose short side is over {DEFAULT_TILE_FACTOR * tile:g} px is cut "
        f"instead into {tile} px tiles (overlapping by half) at its own scale, each tile "
        "prepared so, and the tile answers averaged")
    threshold_info = {k: v for k, v in (ckpt.threshold_info if ckpt else {}).items()
                      if k not in ("value", "source", "val_patient_ids")}
    if ckpt and ckpt.threshold_info.get("val_patient_ids"):  # counts only, as for the split
        threshold_info["val_patients"] = len(ckpt.threshold_info["val_patient_ids"])
    card = {
        "name": f"breast_cancer_detection {predictor.arch}",
        "architecture": predictor.arch,
        "backend": (scorer or predictor).backend,
        "backend_note": (scorer or predictor).backend_note,
        "classes": predictor.classes,
        "preprocessing": {**pre.to_dict(), "description": (
            f"RGB, {resize}, normalised with mean {', '.join(f'{m:g}' for m in pre.mean)} and "
            f"std {', '.join(f'{v:g}' for v in pre.std)}")},
        "training": {
            "data": cfg.get("data"),
            "split": cfg.get("split") or "made by `bcd train`, saved as split.csv in the run "
                                         "folder",
            "split_hash": ckpt.split_hash if ckpt else None,
            "group_by": cfg.get("group_by"),
            "patients": patients,
            "magnification": cfg.get("magnification") or "all",
            "pretrained": cfg.get("pretrained"),
            "epochs": cfg.get("epochs"),
            "best_epoch": ckpt.best_epoch if ckpt else None,
            "created": ckpt.created if ckpt else None,
        },
        "metrics": {
            "validation": (ckpt.metrics if ckpt else None) or None,
            "evaluation": evaluation,
            "note": None if evaluation else (
                "No test-set evaluation was given: the validation figures chose the epoch and "
                "are optimistic. Run `bcd evaluate CKPT` and serve with --report "
                "reports/.../metrics.json for test metrics with 95% confidence intervals."),
        },
        "threshold": {"value": predictor.threshold, "source": predictor.threshold_source,
                      **threshold_info},
        # The model's own words (its registry entry for a named model): the page shows them.
        **predictor.scope(),
        "trained_model": (predictor.trained_model.card()
                          if getattr(predictor, "trained_model", None) else None),
        "versions": {"training": ckpt.versions if ckpt else None,
                     "serving": _serving_versions()},
    }
    return jsonable(card)

"""The decision threshold: chosen on the validation subset, stored in the checkpoint, and
checked when reused (other views, or evaluated patients among those that chose it)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoint import Checkpoint
from .data.breakhis import person_id
from .data.splits import people
from .metrics import choose_threshold, image_metrics

MAX_STORED_IDS = 1000
"""A stored threshold names the validation patients it was chosen on, up to this many."""


def _views(tta: bool | None) -> str:
    return "8-view TTA" if tta else "one-view"


def decide_threshold(ckpt: Checkpoint, val: pd.DataFrame, target_sensitivity: float | None,
                     val_leak: list[str], table_hash: str | None, *, tta: bool = False,
                     evaluated: pd.DataFrame | None = None
                     ) -> tuple[float, dict, list[str]]:
    """The threshold, its description, and caveats; never a silent 0.5.

    A threshold chosen here records whether it was chosen on ``tta`` probabilities and which
    validation patients chose it; a stored one reused here is checked against both: other
    views, or ``evaluated`` patients among those that chose it, get a caveat.
    """
    method = "youden" if target_sensitivity is None else "target_sensitivity"
    caveats = []
    if len(val) and val["target"].nunique() == 2:
        y, p = val["target"].to_numpy(), val["probability"].to_numpy()
        value = choose_threshold(y, p, method, target_sensitivity=target_sensitivity or 0.95)
        at = image_metrics(y, p, value)
        info = {"method": method, "value": value, "chosen_on": "val", "val_images": len(val),
                "val_patients": int(val["patient"].replace("", np.nan).nunique()),
                "target_sensitivity": target_sensitivity, "split_hash": table_hash,
                "val_sensitivity": at["sensitivity"], "val_specificity": at["specificity"],
                "tta": bool(tta),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        ids = sorted(people(val))
        if 0 < len(ids) <= MAX_STORED_IDS:
            info["val_patient_ids"] = ids
        if val_leak:
            caveats.append("The validation subset that chose the threshold overlaps the "
                           "checkpoint's training data (" + " ".join(val_leak) + "); the "
                           "threshold was used here but NOT stored in the checkpoint.")
        return value, {**info, "source": "chosen on val now"}, caveats
    why = ("the split has no validation subset" if not len(val)
           else f"its validation subset ({len(val)} images) holds only one class")
    if ckpt.threshold is not None:
        info = {**ckpt.threshold_info, "value": float(ckpt.threshold),
                "source": "stored in the checkpoint"}
        if "tta" in info and bool(info["tta"]) != bool(tta):
            caveats.append(f"The stored threshold was chosen on {_views(info['tta'])} "
                           f"probabilities and is applied here to {_views(tta)} ones; "
                           "thresholded figures may shift (AUC does not depend on it).")
        chose = {person_id(str(x)) for x in info.get("val_patient_ids") or []}
        if evaluated is not None and chose:
            shared = chose & people(evaluated)
            if shared:
                caveats.append(f"The stored threshold was chosen on a validation subset that "
                               f"holds {len(shared)} of the evaluated patients "
                               f"({', '.join(sorted(shared)[:5])}): accuracy, sensitivity and "
                               "specificity here are optimistic.")
        if target_sensitivity is not None:
            caveats.append(f"--target-sensitivity {target_sensitivity} was ignored: {why}, so "
                           "the threshold stored in the checkpoint was used.")
        return float(ckpt.threshold), info, caveats
    caveats.append(f"NO THRESHOLD WAS CHOSEN: {why} and the checkpoint stores none, so 0.5 was "
                   "used. Accuracy, sensitivity, specificity, precision, F1 and the confusion "
                   "matrix depend on that arbitrary cut; AUC, PR AUC, ECE and Brier do not. "
                   "Evaluate with a split that has a val subset (the run's split.csv) to "
                   "choose one.")
    return 0.5, {"method": "default", "value": 0.5, "chosen_on": None,
                 "source": "default 0.5: NOT chosen on validation"}, caveats


def store_threshold(path: Path, value: float, info: dict) -> None:
    from .checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(load_checkpoint(path).with_threshold(value, info), path)

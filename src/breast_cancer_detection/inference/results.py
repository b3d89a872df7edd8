"""What a prediction gives back, and which inputs it is given: :class:`Prediction` (one
image's answer), :func:`predictions_frame` (the answers as a table), :func:`summarize_patients`
(patient-level answers from BreakHis file names), :func:`collect_images` (the image files
named by paths and folders), and the assembly of answers from the model's outputs
(:func:`tile_answer` for one image, :func:`table_answers` for an index table)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data.breakhis import CLASSES, IMAGE_SUFFIXES, parse_breakhis_name

NON_FINITE = "the model produced non-finite output"
"""How a prediction error caused by the model itself (not the image) begins."""


@dataclass
class Prediction:
    """One image's answer.

    Attributes:
        source: The file path, or ``<image N>`` for an image given in memory.
        probabilities: Class name -> probability; NaN when the image could not be read.
        label: The class at the stored threshold on P(malignant), or ``"error"``.
        threshold: P(malignant) at or above which the label is malignant.
        error: Why the image could not be read, or None.
        tiles: How many tiles were averaged: 1 for an image predicted whole, 0 after an error.
        heatmap: For a tiled image, P(malignant) of each tile as a ``(rows, cols)`` array in
            image order (row 0 at the top); None otherwise.
        warning: Why this image lies outside what the model was made for (see
            :meth:`Predictor.scope_warning`), or None.
        size: ``(width, height)`` of the image in pixels; None when it could not be read.
    """

    source: str
    probabilities: dict[str, float]
    label: str
    threshold: float
    error: str | None = None
    tiles: int = 1
    heatmap: np.ndarray | None = None
    warning: str | None = None
    size: tuple[int, int] | None = None

    @property
    def p_malignant(self) -> float:
        """The probability of the malignant class (NaN after an error)."""
        return self.probabilities.get(CLASSES[1], float("nan"))

    def to_row(self) -> dict[str, Any]:
        """The prediction as one CSV row: file, label, p_<class>..., threshold, tiles,
        warning, error."""
        row: dict[str, Any] = {"file": self.source, "label": self.label}
        row.update({f"p_{c}": p for c, p in self.probabilities.items()})
        row.update(threshold=self.threshold, tiles=self.tiles, warning=self.warning or "",
                   error=self.error or "")
        return row


def predictions_frame(predictions: list[Prediction], **columns: Any) -> pd.DataFrame:
    """The predictions as a table, one row per image (see :meth:`Prediction.to_row`);
    ``columns`` (e.g. ``model=``, ``backend=``) are added as constant columns."""
    table = pd.DataFrame([p.to_row() for p in predictions])
    for name, value in columns.items():
        table[name] = value
    return table


def summarize_patients(predictions: pd.DataFrame | list[Prediction],
                       threshold: float | None = None) -> pd.DataFrame:
    """Patient-level answers for images whose file names are BreakHis names.

    A patient's P(malignant) is the mean over their readable images; the label applies the
    same threshold as the images. Files whose names do not parse, and failed images, are left
    out.

    Args:
        predictions: :func:`predictions_frame` output (or the CSV ``bcd predict`` writes), or
            the Prediction list itself.
        threshold: Decision threshold; None takes the table's ``threshold`` column.

    Returns:
        One row per patient: ``patient``, ``images``, ``p_malignant``, ``label``,
        ``threshold`` and ``name_label`` (the class the BreakHis file names state). Empty
        when no file name parses.
    """
    df = predictions if isinstance(predictions, pd.DataFrame) else predictions_frame(predictions)
    columns = ["patient", "images", "p_malignant", "label", "threshold", "name_label"]
    errors = df["error"].fillna("").astype(str) if "error" in df else pd.Series("", df.index)
    names = [parse_breakhis_name(Path(str(f)).name) for f in df["file"]]
    keep = [n is not None and e == "" and np.isfinite(p)
            for n, e, p in zip(names, errors, df["p_malignant"])]
    if not any(keep):
        return pd.DataFrame(columns=columns)
    sub = df[keep].assign(patient=[n.patient for n, k in zip(names, keep) if k],
                          name_label=[n.label for n, k in zip(names, keep) if k])
    if threshold is None:
        threshold = float(sub["threshold"].iloc[0])
    out = sub.groupby("patient", sort=True).agg(
        images=("p_malignant", "size"), p_malignant=("p_malignant", "mean"),
        name_label=("name_label", lambda s: "/".join(sorted(set(s))))).reset_index()
    out["label"] = np.where(out["p_malignant"] >= threshold, CLASSES[1], CLASSES[0])
    out["threshold"] = threshold
    return out[columns]


# ----------------------------------------------------------------------------- inputs


def collect_images(paths) -> list[Path]:
    """The image files named by ``paths``: files as given, folders searched recursively.

    A folder contributes its image files (by suffix, hidden files skipped) in sorted order.
    A file is kept whatever its suffix, so a wrong or unreadable file named explicitly ends
    up as an error row instead of being passed over silently.
    """
    out: list[Path] = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                          and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


# ----------------------------------------------------------------------------- assembly


def tile_answer(name: str, probs: list[np.ndarray] | None, classes: list[str],
                threshold: float, *, error: str | None = None,
                grid: tuple[int, int] | None = None,
                size: tuple[int, int] | None = None) -> Prediction:
    """One image's :class:`Prediction` from the softmax outputs of its model inputs (one for
    an image predicted whole, one a tile for a tiled one), averaged.

    Args:
        name: The answer's ``source``.
        probs: The outputs, each ``(classes,)``; None or empty when nothing was scored.
        classes: Class names in output order.
        threshold: P(malignant) at or above which the label is malignant.
        error: Why the image could not be prepared, or None.
        grid: ``(rows, cols)`` of a tiled image's tiles, for the heatmap; None otherwise.
        size: ``(width, height)`` of the image as read.
    """
    if error is not None or not probs:
        return Prediction(name, dict.fromkeys(classes, float("nan")), "error",
                          threshold, error=error or "no prediction", tiles=0)
    p = np.stack(probs)
    if not np.isfinite(p).all():
        # NaN >= threshold is False: without this check a broken model answers "benign".
        return Prediction(name, dict.fromkeys(classes, float("nan")), "error",
                          threshold, tiles=0,
                          error=f"{NON_FINITE} (NaN or "
                          "infinity), so there is no answer; the checkpoint's weights are "
                          "damaged or the model overflowed. Check the checkpoint (retrain, "
                          "or download it again); run on another device to rule out the "
                          "hardware.")
    mean = p.mean(0)
    heatmap = p[:, 1].reshape(grid) if grid is not None else None
    return Prediction(name, {c: float(v) for c, v in zip(classes, mean)},
                      classes[int(mean[1] >= threshold)], threshold,
                      tiles=len(p), heatmap=heatmap, size=size)


def table_answers(table: pd.DataFrame, prob: np.ndarray, errors: dict[int, str],
                  threshold: float) -> pd.DataFrame:
    """An index table's answers (:meth:`Predictor.predict_table`): ``table`` (index 0..n-1)
    with ``probability`` (P(malignant), ``prob``), ``prediction`` (0/1 at ``threshold``, -1
    without an answer) and ``error`` (``errors`` by row, else empty) columns added."""
    result = table.copy()
    result["probability"] = prob
    result["prediction"] = np.where(np.isnan(prob), -1, (prob >= threshold).astype(int))
    result["error"] = [errors.get(i, "") for i in range(len(table))]
    # A read image without a finite answer is the model's failure: never a silent NaN.
    broken = np.flatnonzero(~np.isfinite(prob) & (result["error"] == "").to_numpy())
    result.loc[broken, "error"] = f"{NON_FINITE} (NaN or infinity)"
    result.loc[broken, "prediction"] = -1
    return result

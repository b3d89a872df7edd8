"""Metrics as pure functions: arrays in, numbers or dicts out (image and patient level).

Conventions: class 1 is malignant (the positive class); ``p`` is P(malignant); an image is
called malignant when ``p >= threshold``. A number that is undefined on the data given (AUC
with one class, specificity without benign images) is NaN, never a made-up 0 or 1.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

# ----------------------------------------------------------------------------- image level


def roc_auc(y_true, p_malignant) -> float:
    """ROC AUC, or NaN when only one class is present (AUC is undefined then).

    Computed as the Mann-Whitney statistic (ties count one half), which equals scikit-learn's
    ``roc_auc_score`` and is several times faster: the bootstrap calls it thousands of times.
    """
    from scipy.stats import rankdata

    y = np.asarray(y_true).astype(int)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(p_malignant, dtype=float))
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def accuracy(y_true, p_malignant, threshold: float = 0.5) -> float:
    """Share of images whose thresholded probability matches the label."""
    y = np.asarray(y_true)
    if len(y) == 0:
        return float("nan")
    return float(np.mean((np.asarray(p_malignant) >= threshold).astype(int) == y))


def pr_auc(y_true, p_malignant) -> float:
    """Area under the precision-recall curve as average precision; NaN without malignant.

    Average precision is the sum over distinct thresholds of (recall step) x precision, as
    scikit-learn's ``average_precision_score`` defines it (no interpolation).
    """
    y = np.asarray(y_true).astype(int)
    if len(y) == 0 or y.sum() == 0:
        return float("nan")
    p = np.asarray(p_malignant, dtype=float)
    order = np.argsort(-p, kind="stable")
    p, y = p[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]  # the end of each tied group
    tps = np.cumsum(y)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def confusion(y_true, y_pred) -> list[list[int]]:
    """The 2x2 confusion matrix ``[[TN, FP], [FN, TP]]``: rows true, columns predicted."""
    y = np.asarray(y_true).astype(int)
    yp = np.asarray(y_pred).astype(int)
    return [[int(np.sum((y == t) & (yp == q))) for q in (0, 1)] for t in (0, 1)]


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def _rates(y_true, y_pred) -> dict[str, float]:
    (tn, fp), (fn, tp) = confusion(y_true, y_pred)
    n = tn + fp + fn + tp
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    present = [r for r in (sens, spec) if not np.isnan(r)]
    return {
        "accuracy": _ratio(tp + tn, n),
        # Like scikit-learn: the mean recall over the classes present.
        "balanced_accuracy": float(np.mean(present)) if present else float("nan"),
        "sensitivity": sens,
        "specificity": spec,
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def _probabilities(p_malignant) -> np.ndarray:
    """P(malignant) as floats, refusing NaN and infinity: thresholded counts would call such an
    image benign and calibration would skip it, each silently, and differently.

    Raises:
        ValueError: naming how many are not finite.
    """
    p = np.asarray(p_malignant, dtype=float)
    bad = int((~np.isfinite(p)).sum())
    if bad:
        raise ValueError(f"{bad} of the {p.size} probabilities are not finite (NaN or "
                         "infinity): leave those images out first (predict_table marks them "
                         "as error rows).")
    return p


def image_metrics(y_true, p_malignant, threshold: float = 0.5) -> dict:
    """Every image-level number at one decision threshold.

    Args:
        y_true: 0 (benign) / 1 (malignant) per image.
        p_malignant: P(malignant) per image.
        threshold: An image is called malignant when its probability is at least this.

    Returns:
        ``images``, ``malignant`` (count), ``threshold``, ``accuracy``, ``balanced_accuracy``,
        ``sensitivity`` (malignant recall), ``specificity`` (benign recall), ``precision``,
        ``f1``, ``roc_auc``, ``pr_auc`` and ``confusion_matrix`` (``[[TN, FP], [FN, TP]]``).
    """
    y = np.asarray(y_true).astype(int)
    p = _probabilities(p_malignant)
    out: dict = {"images": len(y), "malignant": int(y.sum()), "threshold": float(threshold)}
    out.update(_rates(y, p >= threshold))
    out["roc_auc"] = roc_auc(y, p)
    out["pr_auc"] = pr_auc(y, p)
    return out


# ----------------------------------------------------------------------------- patient level


def _per_patient(y: np.ndarray, p: np.ndarray, patients, threshold: float):
    """Patient ids (sorted) and, per patient: images, class, mean p, share of images right."""
    p = _probabilities(p)
    codes, ids = pd.factorize(np.asarray(patients), sort=True)
    n = len(ids)
    images = np.bincount(codes, minlength=n)
    target = (np.bincount(codes, weights=y, minlength=n) > 0).astype(int)
    mean_p = np.bincount(codes, weights=p, minlength=n) / images
    right = np.bincount(codes, weights=((p >= threshold).astype(int) == y), minlength=n) / images
    return ids, images, target, mean_p, right


def patient_table(y_true, p_malignant, patients, threshold: float = 0.5) -> pd.DataFrame:
    """One row per patient: its images, class, mean P(malignant) and share of images right.

    A patient's class is malignant when any of its images is (BreakHis patients have one
    class; the rule only matters for odd data).

    Returns:
        Indexed by patient: ``images``, ``target``, ``mean_probability``, ``image_accuracy``
        (share of the patient's images classified correctly at ``threshold``), ``prediction``
        (1 when ``mean_probability >= threshold``).
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(p_malignant, dtype=float)
    ids, images, target, mean_p, right = _per_patient(y, p, patients, threshold)
    return pd.DataFrame({"images": images, "target": target, "mean_probability": mean_p,
                         "image_accuracy": right,
                         "prediction": (mean_p >= threshold).astype(int)},
                        index=pd.Index(ids, name="patient"))


def patient_recognition_rate(y_true, y_pred, patients) -> float:
    """Spanhol et al.'s patient recognition rate.

    For each patient, the share of its images classified correctly (N_rec / N_P); then the
    mean of those shares over patients, so each patient counts once however many images it
    has.

    Args:
        y_true: True class per image.
        y_pred: Predicted class per image (0/1).
        patients: Patient id per image.
    """
    y = np.asarray(y_true).astype(int)
    if len(y) == 0:
        return float("nan")
    codes, ids = pd.factorize(np.asarray(patients))
    right = np.bincount(codes, weights=(np.asarray(y_pred).astype(int) == y), minlength=len(ids))
    return float(np.mean(right / np.bincount(codes, minlength=len(ids))))


def patient_metrics(y_true, p_malignant, patients, threshold: float = 0.5) -> dict:
    """Patient-level numbers: the recognition rate, and a decision per patient.

    The patient-level decision calls a patient malignant when the mean P(malignant) over its
    images is at least ``threshold``; its AUC ranks patients by that mean.

    Returns:
        ``patients``, ``malignant_patients``, ``recognition_rate`` (Spanhol et al.),
        ``accuracy``, ``balanced_accuracy``, ``sensitivity``, ``specificity``, ``precision``,
        ``f1``, ``roc_auc`` and ``confusion_matrix`` of the per-patient decisions.
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(p_malignant, dtype=float)
    if len(y) == 0:
        return {"patients": 0, "malignant_patients": 0, "recognition_rate": float("nan"),
                **_rates(y, y), "roc_auc": float("nan")}
    _, _, target, mean_p, right = _per_patient(y, p, patients, threshold)
    out: dict = {"patients": len(target), "malignant_patients": int(target.sum()),
                 "recognition_rate": float(right.mean())}
    out.update(_rates(target, mean_p >= threshold))
    out["roc_auc"] = roc_auc(target, mean_p)
    return out


# ----------------------------------------------------------------------------- calibration


def _bin_ids(p: np.ndarray, bins: int) -> np.ndarray:
    # Bins are (lo, hi], the first [0, hi]: the same edges as sklearn's calibration_curve.
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.searchsorted(edges[1:-1], p)


def reliability_curve(y_true, p_malignant, bins: int = 10) -> dict[str, list]:
    """Data for a reliability diagram over ``bins`` equal-width bins of [0, 1].

    Returns:
        Lists with one entry per bin (empty bins included): ``bin_lower``, ``bin_upper``,
        ``count``, ``mean_predicted`` and ``fraction_malignant`` (NaN for an empty bin).
    """
    y = np.asarray(y_true).astype(float)
    p = _probabilities(p_malignant)
    ids = _bin_ids(p, bins)
    count = np.bincount(ids, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(ids, weights=p, minlength=bins) / count
        frac = np.bincount(ids, weights=y, minlength=bins) / count
    edges = np.linspace(0.0, 1.0, bins + 1)
    return {"bin_lower": edges[:-1].tolist(), "bin_upper": edges[1:].tolist(),
            "count": count.astype(int).tolist(), "mean_predicted": mean_p.tolist(),
            "fraction_malignant": frac.tolist()}


def expected_calibration_error(y_true, p_malignant, bins: int = 10) -> float:
    """ECE: the image-weighted mean gap between confidence and frequency over equal-width bins.

    Computed on P(malignant) against the malignant frequency in each bin (the binary form):
    sum over bins of ``count / N * |mean P(malignant) - share malignant|``.
    """
    curve = reliability_curve(y_true, p_malignant, bins)
    count = np.asarray(curve["count"], dtype=float)
    if count.sum() == 0:
        return float("nan")
    gap = np.abs(np.asarray(curve["mean_predicted"]) - np.asarray(curve["fraction_malignant"]))
    return float(np.sum(np.where(count > 0, count * np.nan_to_num(gap), 0.0)) / count.sum())


def brier_score(y_true, p_malignant) -> float:
    """Mean squared difference between P(malignant) and the 0/1 label."""
    y = np.asarray(y_true).astype(float)
    if len(y) == 0:
        return float("nan")
    return float(np.mean((_probabilities(p_malignant) - y) ** 2))


def calibration_metrics(y_true, p_malignant, bins: int = 10) -> dict:
    """``ece``, ``brier``, ``bins`` and the ``reliability`` curve data."""
    return {"ece": expected_calibration_error(y_true, p_malignant, bins),
            "brier": brier_score(y_true, p_malignant), "bins": bins,
            "reliability": reliability_curve(y_true, p_malignant, bins)}


# ----------------------------------------------------------------------------- threshold


THRESHOLD_METHODS = ("youden", "target_sensitivity")


def choose_threshold(y_true, p_malignant, method: str = "youden", *,
                     target_sensitivity: float = 0.95) -> float:
    """Picks a decision threshold on labelled (validation) data.

    The cut is placed halfway between the lowest probability it calls malignant and the next
    lower one, so it does not hug a validation image; images are called malignant when
    ``p >= threshold``.

    Args:
        method: ``youden``: maximises Youden's J = sensitivity + specificity - 1 (the
            highest such cut on ties). ``target_sensitivity``: the highest cut whose
            sensitivity reaches ``target_sensitivity``, which keeps specificity as high as
            that target allows.
        target_sensitivity: The sensitivity to reach, with ``method="target_sensitivity"``.

    Raises:
        ValueError: an unknown method, a target outside (0, 1], or data without both classes.
    """
    from sklearn.metrics import roc_curve

    if method not in THRESHOLD_METHODS:
        raise ValueError(f"method={method!r}: use one of {', '.join(THRESHOLD_METHODS)}.")
    y = np.asarray(y_true).astype(int)
    p = np.asarray(p_malignant, dtype=float)
    if len(np.unique(y)) < 2:
        raise ValueError(f"choosing a threshold needs both classes; these {len(y)} images have "
                         "only one.")
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    # Index 0 is sklearn's "call nothing malignant" point (threshold inf): never a choice.
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]
    if method == "youden":
        # J in whole counts (J * P * N = TP * N - FP * P): ties are exact, so argmax takes the
        # highest tied cut, not whichever one float rounding favours.
        pos = int(y.sum())
        neg = len(y) - pos
        tp, fp = np.rint(tpr * pos).astype(np.int64), np.rint(fpr * neg).astype(np.int64)
        i = int(np.argmax(tp * neg - fp * pos))
    else:
        if not 0 < target_sensitivity <= 1:
            raise ValueError(f"target_sensitivity={target_sensitivity} must be in (0, 1].")
        i = int(np.argmax(tpr >= target_sensitivity - 1e-12))
    # thr holds the distinct probabilities in decreasing order: any cut in (thr[i+1], thr[i]]
    # gives the same validation result, and the middle is the one with the most margin.
    return float((thr[i] + thr[i + 1]) / 2 if i + 1 < len(thr) else thr[i])


# ----------------------------------------------------------------------------- all together


def _has_patients(df: pd.DataFrame) -> bool:
    return "patient" in df.columns and len(df) > 0 and bool(df["patient"].astype(str).ne("").all())


def evaluate_predictions(df: pd.DataFrame, threshold: float = 0.5, *, bins: int = 10) -> dict:
    """Image-level, patient-level and calibration numbers for a table of predictions.

    Args:
        df: Columns ``target`` (0/1) and ``probability`` (P(malignant)); ``patient`` for the
            patient level (without it, or with empty ids, ``patient`` holds a ``note``).
        threshold: The decision threshold.
        bins: Calibration bins.

    Returns:
        ``{"image": {...}, "patient": {...}, "calibration": {...}}``.
    """
    y, p = df["target"].to_numpy(dtype=int), df["probability"].to_numpy(dtype=float)
    out = {"image": image_metrics(y, p, threshold)}
    if _has_patients(df):
        out["patient"] = patient_metrics(y, p, df["patient"].to_numpy(), threshold)
    else:
        out["patient"] = {"note": "no patient ids"}
    out["calibration"] = calibration_metrics(y, p, bins)
    return out


def pooled_metrics(df: pd.DataFrame) -> dict[str, float]:
    """Out-of-fold predictions of several models, pooled: each row decided at its own model's
    threshold.

    Args:
        df: ``target``, ``probability``, ``threshold`` (of the fold that scored the row) and
            ``patient`` columns; a patient's rows all come from one fold.

    Returns:
        ``image_roc_auc`` and ``image_accuracy`` over all rows, ``patient_roc_auc`` (patients
        ranked by their mean probability) and ``patient_accuracy`` (mean probability at the
        fold's threshold), ``images`` and ``patients``.
    """
    y = df["target"].to_numpy(dtype=int)
    p = _probabilities(df["probability"].to_numpy(dtype=float))
    t = df["threshold"].to_numpy(dtype=float)
    patients = df["patient"].astype(str).to_numpy()
    ids, _, target, mean_p, _ = _per_patient(y, p, patients, 0.5)
    # A patient's rows share one fold, so its mean threshold is that fold's threshold.
    _, _, _, mean_t, _ = _per_patient(y, t, patients, 0.5)
    n = len(ids)
    return {"images": float(len(y)), "patients": float(n),
            "image_roc_auc": roc_auc(y, p), "image_accuracy": float(np.mean((p >= t) == y)),
            "patient_roc_auc": roc_auc(target, mean_p),
            "patient_accuracy": float(np.mean((mean_p >= mean_t) == target))}


def scalar_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested metrics dict as ``{"image.accuracy": 0.9, ...}``.

    Counts, thresholds and bin numbers are left out: they are settings or sizes, not metrics.
    """
    skip = {"images", "malignant", "patients", "malignant_patients", "threshold", "bins"}
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(scalar_metrics(value, f"{name}."))
        elif (isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
              and key not in skip):
            flat[name] = float(value)
    return flat


def metrics_by(df: pd.DataFrame, column: str, threshold: float = 0.5, *,
               bins: int = 10) -> dict[str, dict]:
    """:func:`evaluate_predictions` for each value of ``column`` (magnification, subtype).

    Empty values are left out; magnifications sort by their number (40X before 100X).
    """
    if column not in df.columns:
        return {}
    values = [v for v in df[column].astype(str).unique() if v != ""]
    values.sort(key=group_sort_key)
    return {v: evaluate_predictions(df[df[column].astype(str) == v], threshold, bins=bins)
            for v in values}


def group_sort_key(value: str):
    """Sorts magnifications by their number (``40X`` before ``100X``), other names after."""
    digits = value.rstrip("Xx")
    return (0, int(digits), value) if digits.isdigit() else (1, 0, value)


# ----------------------------------------------------------------------------- bootstrap


def _units(df: pd.DataFrame, group: str | None) -> np.ndarray:
    """One resampling unit id per row: its patient, or the row itself when it has none."""
    if group is None or group not in df.columns:
        return np.arange(len(df))
    ids = df[group].astype(str).to_numpy()
    own = np.array([f"\0row{i}" for i in range(len(df))], dtype=object)
    return pd.factorize(np.where(ids == "", own, ids))[0]


def bootstrap_metrics(df: pd.DataFrame, metrics_fn: Callable[[pd.DataFrame], dict[str, float]],
                      *, n: int = 1000, seed: int = 0, alpha: float = 0.05,
                      group: str | None = "patient") -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals for several metrics from the same resamples.

    Whole patients are resampled with replacement (rows without a patient id, or all rows
    when ``group`` is None or missing, are resampled one by one). In each resample the
    ``group`` column holds the draw number, so a patient drawn twice counts as two patients
    at the patient level.

    Args:
        df: The predictions table.
        metrics_fn: Maps a (resampled) table to ``{name: number}``.
        n: Resamples.
        seed: Seed of the resampling; the same seed gives the same intervals.
        alpha: 0.05 gives 95% intervals.
        group: The column to resample by.

    Returns:
        ``{name: (low, high)}``; ``(nan, nan)`` for a metric that was undefined (NaN) in half
        of the resamples or more, e.g. an AUC when most resamples hold one class.
    """
    if n < 1:
        raise ValueError(f"n={n}: the bootstrap needs at least one resample.")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1).")
    units = _units(df, group)
    relabel = group is not None and group in df.columns
    no_id = df[group].astype(str).eq("").to_numpy() if relabel else None
    n_units = int(units.max()) + 1 if len(units) else 0
    if n_units == 0:
        return {}
    one_row_each = n_units == len(df)
    order = np.argsort(units, kind="stable")
    starts = np.searchsorted(units[order], np.arange(n_units + 1))
    rows = [order[starts[u]:starts[u + 1]] for u in range(n_units)]
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {}
    for _ in range(n):
        draw = rng.integers(0, n_units, n_units)
        if one_row_each:
            idx, label = order[starts[draw]], np.arange(n_units)
        else:
            idx = np.concatenate([rows[u] for u in draw])
            label = np.repeat(np.arange(n_units), [len(rows[u]) for u in draw])
        sample = df.iloc[idx].reset_index(drop=True)
        if relabel:
            sample[group] = np.where(no_id[idx], "", label.astype(str))
        for name, v in metrics_fn(sample).items():
            values.setdefault(name, []).append(float(v))
    out = {}
    for name, vals in values.items():
        arr = np.asarray(vals)
        arr = arr[np.isfinite(arr)]
        if len(arr) * 2 <= len(vals):
            out[name] = (float("nan"), float("nan"))
        else:
            low, high = np.quantile(arr, [alpha / 2, 1 - alpha / 2])
            out[name] = (float(low), float(high))
    return out


def bootstrap_ci(df: pd.DataFrame, metric_fn: Callable[[pd.DataFrame], float], n: int = 1000,
                 seed: int = 0, alpha: float = 0.05, *,
                 group: str | None = "patient") -> tuple[float, float]:
    """A percentile bootstrap interval for one metric, resampling whole patients.

    Args:
        df: The predictions table (e.g. ``target``, ``probability``, ``patient``).
        metric_fn: Maps a (resampled) table to a number.
        n: Resamples.
        seed: The same seed gives the same interval.
        alpha: 0.05 gives a 95% interval.
        group: The column to resample by; rows with an empty id are resampled one by one.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when the metric was undefined in most resamples.
    """
    return bootstrap_metrics(df, lambda d: {"m": metric_fn(d)}, n=n, seed=seed, alpha=alpha,
                             group=group)["m"]

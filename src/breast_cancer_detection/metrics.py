"""Metrics as pure functions: arrays in, numbers or dicts out."""

from __future__ import annotations

import numpy as np


def roc_auc(y_true, p_malignant) -> float:
    """ROC AUC, or NaN when only one class is present (AUC is undefined then)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, np.asarray(p_malignant)))


def accuracy(y_true, p_malignant, threshold: float = 0.5) -> float:
    """Share of images whose thresholded probability matches the label."""
    y = np.asarray(y_true)
    if len(y) == 0:
        return float("nan")
    return float(np.mean((np.asarray(p_malignant) >= threshold).astype(int) == y))

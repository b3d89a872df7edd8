"""Every figure of the package: predictions, sample grids, learning curves and the evaluation
report's ROC, PR, confusion, reliability and per-magnification plots.

Each plot function returns a ``matplotlib.figure.Figure`` made without pyplot (drawn on the Agg
canvas), so nothing opens a window or touches pyplot's global state, also from threads or
servers. Show one with ``display(fig)``; write one with :func:`save_figure`.
"""

from __future__ import annotations

import functools
import io
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .inference import Prediction

# The palette of every figure: one colour per class, one accent for a second series.
MALIGNANT_COLOR = "#8e2c6b"
BENIGN_COLOR = "#e39bc4"
ACCENT_COLOR = "#2b6ca3"
# Bars of several metrics side by side take these in turn.
SERIES_COLORS = (MALIGNANT_COLOR, BENIGN_COLOR, ACCENT_COLOR, "#9ac1e0", "#5a5a5a")
# Shares of a class (confusion matrix): the malignant hue, light to dark.
SHARE_CMAP = "Purples"
# P(malignant) laid over H&E tissue: cividis (dark blue low, yellow high) stands out from the
# stain's pinks and purples, and, unlike a red-green scale, reads the same with the common
# colour blindnesses (it was designed for them). Every heat map carries a colour bar.
HEATMAP_CMAP = "cividis"
# What no model input covered (glass, or tissue not scored), named in legends.
UNSCORED_COLOR = "#bdbdbd"
# Resolution of every written figure.
DPI = 120


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a figure (format from the suffix: ``.png``, ``.pdf``, ``.svg``) and close it.

    Args:
        fig: A figure from this module, or any matplotlib figure; do not draw into it after.
        path: Where to write; missing parent folders are made.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    # This module's figures go with their last reference; one drawn into through pyplot axes
    # (plot_prediction's ``ax``) stays in pyplot's list, and memory, until closed there. Only
    # when pyplot is already loaded: importing it here would pick a GUI backend.
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)
    return path


@functools.cache
def _shown_figure_class() -> type:
    from matplotlib.figure import Figure

    class ShownFigure(Figure):
        """A figure that Jupyter shows as a picture: ``display(fig)`` finds ``_repr_png_``,
        also where no pyplot backend registered a formatter (ipykernel 7 with matplotlib 3.11
        showed a figure made without pyplot as the text ``<Figure size ...>``)."""

        def _repr_png_(self) -> bytes:
            buf = io.BytesIO()
            self.savefig(buf, format="png", dpi=DPI)
            return buf.getvalue()

    return ShownFigure


def _figure(width: float = 5.0, height: float = 4.2) -> Figure:
    return _shown_figure_class()(figsize=(width, height), layout="constrained")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


# ---------------------------------------------------------------------------------------------
# Data, training and single predictions
# ---------------------------------------------------------------------------------------------


def plot_prediction(image, prediction: Prediction, ax: tuple[Axes, Axes] | None = None
                    ) -> Figure:
    """The original notebook's figure: the image titled with its predicted class, above a
    horizontal bar chart of the class probabilities.

    A tiled image also shows its tile heat map of P(malignant), faintly, over the picture.

    Args:
        image: Path, PIL image or array (as given to ``predict``).
        prediction: Its :class:`~breast_cancer_detection.inference.Prediction`.
        ax: A pair of axes (image, bars) to draw into; None makes a new figure. The figure
            is made without pyplot, so it works under any backend; save it with
            :func:`save_figure` or show it with ``display(fig)``.

    Returns:
        The figure drawn into.
    """
    from .data.datasets import open_rgb

    picture = open_rgb(image, max_pixels=None)
    if ax is None:
        # The image panel takes the picture's aspect, so wide images leave no blank band.
        image_height = 5.0 * picture.height / picture.width
        fig = _figure(5.0, image_height + 1.6)
        img_ax, bar_ax = fig.subplots(2, 1, gridspec_kw={"height_ratios": [image_height, 1.2]})
    else:
        img_ax, bar_ax = ax
        fig = img_ax.figure
    img_ax.imshow(picture)
    if prediction.heatmap is not None:
        w, h = picture.size
        tint = img_ax.imshow(prediction.heatmap, extent=(0, w, h, 0), cmap=HEATMAP_CMAP,
                             vmin=0, vmax=1, alpha=0.3, interpolation="nearest")
        _threshold_bar(fig, tint, img_ax, prediction.threshold,
                       f"P(malignant) of each of {prediction.tiles} tiles")
    img_ax.set_axis_off()
    title = prediction.label
    if np.isfinite(prediction.p_malignant):
        title += f"  (P(malignant) = {prediction.p_malignant:.3f})"
    img_ax.set_title(title)

    classes = list(prediction.probabilities)
    probs = [prediction.probabilities[c] for c in classes]
    bars = bar_ax.barh(classes, probs, color=[BENIGN_COLOR, MALIGNANT_COLOR][: len(classes)])
    bar_ax.bar_label(bars, labels=[f"{p:.3f}" for p in probs], padding=3)
    bar_ax.set_xlim(0, 1.15)
    bar_ax.set_xlabel("probability")
    bar_ax.invert_yaxis()  # classes read top to bottom in their own order
    if len(classes) == 2:
        # The threshold that decided the label, on the malignant bar's scale.
        bar_ax.axvline(prediction.threshold, color="black", linestyle="--", linewidth=1.2,
                       label=f"threshold {prediction.threshold:.4g}: at or above, "
                             f"{classes[1]}", gid="threshold")
        bar_ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8, frameon=False)
    return fig


CAM_CMAP = "viridis"
"""Grad-CAM maps: perceptually uniform and readable with the common colour blindnesses."""


def _threshold_bar(fig: Figure, shown, ax: Axes, threshold: float | None, label: str):
    """A colour bar for a map of P(malignant), with the threshold drawn across it."""
    if threshold is not None:
        label += f"; line: threshold {threshold:.3f}"
    bar = fig.colorbar(shown, ax=ax, shrink=0.8, label=label)
    if threshold is not None:
        bar.ax.axhline(threshold, color="black", linewidth=1.5, gid="threshold")
    return bar


def plot_explanation(view, cam: np.ndarray, *, title: str = "Grad-CAM",
                     view_title: str = "the image") -> Figure:
    """The image beside its Grad-CAM laid over it, at the image's aspect, with a colour bar
    saying what the colours mean. Parts of the map that are NaN (no model input showed them)
    stay uncoloured, and a legend says so.

    Args:
        view: The image the map belongs to (PIL image or array), as :func:`bcd.explain`
            returns it.
        cam: The map in [0, 1] (NaN where there is no value), of the view's size.
        title: Title of the map's panel (e.g. the label it explains).
        view_title: Title of the plain image's panel.
    """
    from matplotlib.patches import Patch

    picture = np.asarray(view)
    h, w = picture.shape[:2]
    fig = _figure(8.0, 4.0 * h / w + 1.0)
    left, right = fig.subplots(1, 2)
    left.imshow(picture)
    left.set_title(view_title)
    right.imshow(picture)
    shown = right.imshow(np.ma.masked_invalid(cam), cmap=CAM_CMAP, vmin=0, vmax=1, alpha=0.5,
                         extent=(0, w, h, 0), interpolation="bilinear")
    right.set_title(title)
    for a in (left, right):
        a.set_axis_off()
    fig.colorbar(shown, ax=right, fraction=0.046, pad=0.02,
                 label="evidence for the class (Grad-CAM, 0-1)")
    if not np.isfinite(cam).all():
        fig.legend(handles=[Patch(facecolor="none", edgecolor=UNSCORED_COLOR,
                                  label="no colour: a part no model input showed")],
                   loc="lower center", frameon=False, fontsize=8)
    return fig


def plot_sample_grid(index, root, *, per_cell: int = 1, seed: int = 0) -> Figure:
    """A grid of example images: one row per class, one column per magnification.

    Args:
        index: Table from ``build_index`` (its ``path`` relative to ``root``).
        root: The data folder.
        per_cell: Images per class x magnification cell, side by side.
        seed: Which images are picked.
    """
    from .data.breakhis import CLASSES
    from .data.datasets import open_rgb

    mags = sorted((m for m in index["magnification"].unique() if m), key=lambda m: int(m[:-1]))
    mags = mags or [""]
    cols = len(mags) * per_cell
    fig = _figure(2.4 * cols, 2.0 * len(CLASSES) + 0.4)
    axes = fig.subplots(len(CLASSES), cols, squeeze=False)
    for r, cls in enumerate(CLASSES):
        for c, mag in enumerate(mags):
            cell = index[(index["label"] == cls) & (index["magnification"] == mag)]
            picks = cell.sample(min(per_cell, len(cell)), random_state=seed) if len(cell) else []
            for k in range(per_cell):
                ax = axes[r][c * per_cell + k]
                ax.set_xticks([])
                ax.set_yticks([])
                if k < len(picks):
                    row = picks.iloc[k]
                    ax.imshow(open_rgb(Path(root) / row["path"], max_pixels=None))
                    ax.set_title(f"{cls} {mag}".strip() + (f"\n{row['subtype']}"
                                                             if row["subtype"] else ""),
                                 fontsize=8)
                else:
                    ax.set_axis_off()
    return fig


def plot_history(metrics) -> Figure:
    """Loss, accuracy and AUC per epoch, from a run's ``metrics.csv`` (path or table)."""
    import pandas as pd

    m = pd.read_csv(metrics) if not isinstance(metrics, pd.DataFrame) else metrics
    fig = _figure(11.0, 3.2)
    ax_loss, ax_acc, ax_auc = fig.subplots(1, 3)
    for ax, key, title in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        for subset, color in (("train", ACCENT_COLOR), ("val", MALIGNANT_COLOR)):
            col = f"{subset}_{key}"
            if col in m:
                ax.plot(m["epoch"], m[col], marker="o", color=color, label=subset)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    if "val_auc" in m:
        ax_auc.plot(m["epoch"], m["val_auc"], marker="o", color=MALIGNANT_COLOR)
    ax_auc.set_title("validation ROC AUC")
    ax_auc.set_xlabel("epoch")
    return fig


# ---------------------------------------------------------------------------------------------
# The evaluation report
# ---------------------------------------------------------------------------------------------


def plot_roc(y_true, p_malignant, *, threshold: float | None = None,
             patient_curve: tuple | None = None, title: str = "ROC curve") -> Figure:
    """ROC curve with its AUC, the chance diagonal and the operating point at ``threshold``.

    Args:
        patient_curve: Optional ``(y_patient, mean_p_patient)`` drawn as a second curve.
    """
    from sklearn.metrics import roc_curve

    from .metrics import image_metrics, roc_auc

    y = np.asarray(y_true).astype(int)
    p = np.asarray(p_malignant, dtype=float)
    fig = _figure()
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, color=MALIGNANT_COLOR, lw=2,
                label=f"images (AUC {_fmt(roc_auc(y, p))})")
        if threshold is not None:
            m = image_metrics(y, p, threshold)
            ax.plot(1 - m["specificity"], m["sensitivity"], "o", color="black", ms=7,
                    label=f"threshold {threshold:.3g}: sens {_fmt(m['sensitivity'])}, "
                    f"spec {_fmt(m['specificity'])}")
    else:
        ax.text(0.5, 0.5, "one class only:\nROC undefined", ha="center", va="center")
    if patient_curve is not None:
        yp, pp = (np.asarray(a) for a in patient_curve)
        if len(np.unique(yp)) == 2:
            fpr, tpr, _ = roc_curve(yp.astype(int), pp.astype(float))
            ax.plot(fpr, tpr, color=ACCENT_COLOR, lw=1.5, ls="-.",
                    label=f"patients, mean p (AUC {_fmt(roc_auc(yp, pp))})")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=7.5)
    return fig


def plot_pr(y_true, p_malignant, *, threshold: float | None = None,
            title: str = "Precision-recall curve") -> Figure:
    """Precision against recall (malignant), with average precision and the prevalence line."""
    from sklearn.metrics import precision_recall_curve

    from .metrics import image_metrics, pr_auc

    y = np.asarray(y_true).astype(int)
    p = np.asarray(p_malignant, dtype=float)
    fig = _figure()
    ax = fig.subplots()
    if y.sum() > 0:
        precision, recall, _ = precision_recall_curve(y, p)
        ax.step(recall, precision, where="post", color=MALIGNANT_COLOR, lw=2,
                label=f"average precision {_fmt(pr_auc(y, p))}")
        prevalence = y.mean()
        ax.axhline(prevalence, ls="--", color="0.6", lw=1,
                   label=f"chance (malignant share {prevalence:.2f})")
        if threshold is not None:
            m = image_metrics(y, p, threshold)
            if np.isfinite(m["precision"]):
                ax.plot(m["sensitivity"], m["precision"], "o", color="black", ms=7,
                        label=f"threshold {threshold:.3g}")
    else:
        ax.text(0.5, 0.5, "no malignant images:\nPR curve undefined", ha="center", va="center")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.03), xlabel="recall (sensitivity)",
           ylabel="precision (positive predictive value)", title=title)
    if ax.get_legend_handles_labels()[0]:  # nothing to list when the curve is undefined
        ax.legend(loc="lower left", fontsize=7.5)
    return fig


def plot_confusion(matrix, *, classes=("benign", "malignant"),
                   title: str = "Confusion matrix") -> Figure:
    """The 2x2 matrix (rows true, columns predicted) with counts and row percentages."""
    cm = np.asarray(matrix, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig = _figure(4.6, 4.0)
    ax = fig.subplots()
    im = ax.imshow(share, cmap=SHARE_CMAP, vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}\n{100 * share[i, j]:.1f}%", ha="center",
                    va="center", fontsize=12, color="white" if share[i, j] > 0.55 else "black")
    ax.set_xticks(range(len(classes)), [f"predicted\n{c}" for c in classes])
    ax.set_yticks(range(len(classes)), [f"true\n{c}" for c in classes])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    return fig


def plot_reliability(curve: dict, *, ece: float | None = None,
                     brier: float | None = None, title: str = "Reliability diagram") -> Figure:
    """Observed malignant share against mean predicted P(malignant) per bin; counts below.

    Args:
        curve: :func:`bcd.metrics.reliability_curve` output.
    """
    lower = np.asarray(curve["bin_lower"], dtype=float)
    upper = np.asarray(curve["bin_upper"], dtype=float)
    count = np.asarray(curve["count"], dtype=float)
    frac = np.asarray(curve["fraction_malignant"], dtype=float)
    mean_p = np.asarray(curve["mean_predicted"], dtype=float)
    width = upper - lower
    fig = _figure(5.0, 5.2)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    filled = count > 0
    top.bar(lower[filled], frac[filled], width=width[filled], align="edge",
            color=BENIGN_COLOR, edgecolor=MALIGNANT_COLOR, label="observed malignant share")
    top.plot(mean_p[filled], frac[filled], "o-", color=MALIGNANT_COLOR, ms=4,
             label="at the bin's mean prediction")
    top.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1, label="perfect calibration")
    label = ", ".join(s for s in (f"ECE {_fmt(ece)}" if ece is not None else "",
                                  f"Brier {_fmt(brier)}" if brier is not None else "") if s)
    top.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="observed malignant share",
            title=title + (f" ({label})" if label else ""))
    top.legend(loc="upper left", fontsize=7.5)
    bottom.bar(lower, count, width=width, align="edge", color="0.6", edgecolor="0.3")
    bottom.set(xlabel="predicted P(malignant)", ylabel="images")
    bottom.yaxis.get_major_locator().set_params(integer=True)
    if count.max(initial=0) > 0 and count[filled].min() * 50 < count.max():
        bottom.set_yscale("log")  # otherwise the sparse middle bins vanish next to the ends
    return fig


def plot_per_magnification(by_magnification: dict[str, dict], *,
                           ci: dict[str, dict] | None = None,
                           metrics=(("image", "accuracy", "image accuracy"),
                                    ("image", "balanced_accuracy", "balanced accuracy"),
                                    ("image", "roc_auc", "image AUC"),
                                    ("patient", "recognition_rate",
                                     "patient recognition rate")),
                           title: str = "By magnification") -> Figure:
    """Grouped bars of a few metrics per magnification, with bootstrap intervals when given.

    Args:
        by_magnification: ``{magnification: evaluate_predictions(...)}``.
        ci: ``{magnification: {"image": {"accuracy": (low, high)}, ...}}``.
        metrics: ``(section, key, label)`` triples; a metric missing everywhere is left out.
    """
    mags = list(by_magnification)
    shown = [m for m in metrics
             if any(np.isfinite(_get(by_magnification[g], m[0], m[1])) for g in mags)]
    fig = _figure(max(5.0, 1.4 * len(mags) + 2.5), 4.2)
    ax = fig.subplots()
    x = np.arange(len(mags))
    width = 0.8 / max(1, len(shown))
    for k, (section, key, label) in enumerate(shown):
        values = np.array([_get(by_magnification[g], section, key) for g in mags])
        pos = x - 0.4 + width * (k + 0.5)
        err = None
        if ci:
            lows = np.array([_get_ci(ci.get(g, {}), section, key)[0] for g in mags])
            highs = np.array([_get_ci(ci.get(g, {}), section, key)[1] for g in mags])
            ok = np.isfinite(lows) & np.isfinite(highs) & np.isfinite(values)
            err = np.vstack([np.where(ok, values - lows, 0), np.where(ok, highs - values, 0)])
            err = np.clip(err, 0, None)
        ax.bar(pos, np.nan_to_num(values), width=width, color=SERIES_COLORS[k % len(SERIES_COLORS)],
               label=label, yerr=err, capsize=3 if err is not None else 0,
               error_kw={"elinewidth": 1, "ecolor": "0.2"})
        for xi, v in zip(pos, values):
            # Values sit inside the bar's foot, clear of the error bars; undefined ones say so.
            ax.text(xi, 0.02, _fmt(v), ha="center", va="bottom", fontsize=7, rotation=90,
                    color="0.1" if not np.isfinite(v) or k % 2 else "white")
    counts = [by_magnification[g]["image"]["images"] for g in mags]
    ax.set_xticks(x, [f"{g}\n({n} images)" for g, n in zip(mags, counts)])
    ax.set(ylim=(0, 1.3), yticks=np.linspace(0, 1, 6), ylabel="value", title=title)
    ax.legend(loc="upper center", fontsize=7.5, ncols=2, frameon=False)
    return fig


def _get(metrics: dict, section: str, key: str) -> float:
    value = metrics.get(section, {}).get(key)
    return float(value) if isinstance(value, (int, float)) and value is not None else float("nan")


def _get_ci(ci: dict, section: str, key: str) -> tuple[float, float]:
    value = ci.get(section, {}).get(key)
    if value is None or value[0] is None:
        return float("nan"), float("nan")
    return float(value[0]), float(value[1])


# ---------------------------------------------------------------------------------------------
# Whole slides (`bcd slide`)
# ---------------------------------------------------------------------------------------------


def _slide_figure(thumb: np.ndarray, width: float = 8.0, extra: float = 0.6) -> Figure:
    h, w = thumb.shape[:2]
    return _figure(width, max(2.5, width * h / w + extra))


def _for_display(image: np.ndarray, inches: float) -> np.ndarray:
    """``image`` shrunk to the pixels a panel ``inches`` wide shows at :data:`DPI` (drawing
    a larger one costs time and shows nothing more); masks stay boolean."""
    from PIL import Image

    side = max(1, round(inches * DPI))
    h, w = image.shape[:2]
    if w <= side:
        return image
    size = (side, max(1, round(h * side / w)))
    if image.dtype == bool:
        return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.NEAREST))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def plot_slide_heatmap(thumb: np.ndarray, heat: np.ndarray, extent: tuple[float, float], *,
                       threshold: float | None = None, title: str = "") -> Figure:
    """P(tumour) per tile over the slide's thumbnail, with a colour bar.

    Args:
        thumb: ``(H, W, 3)`` thumbnail.
        heat: ``(rows, cols)`` P(tumour) per tile, NaN where no tile was read (left clear).
        extent: ``(width, height)`` of the tile grid in thumbnail pixels.
        threshold: Marked on the colour bar.
        title: The figure's title.
    """
    fig = _slide_figure(thumb, extra=1.0)
    ax = fig.subplots()
    h, w = thumb.shape[:2]
    ax.imshow(_for_display(thumb, 8.0), extent=(0, w, h, 0))
    shown = ax.imshow(np.ma.masked_invalid(heat), extent=(0, extent[0], extent[1], 0),
                      cmap=HEATMAP_CMAP, vmin=0, vmax=1, alpha=0.55, interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    _threshold_bar(fig, shown, ax, threshold, "P(tumour)")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor="none", edgecolor=UNSCORED_COLOR,
                             label="no colour: not scored (glass, or less tissue than "
                                   "--min-tissue)")],
              loc="upper center", bbox_to_anchor=(0.5, -0.01), frameon=False, fontsize=8)
    ax.set_title(title)
    return fig


def plot_tissue(thumb: np.ndarray, mask: np.ndarray, *, title: str = "") -> Figure:
    """The thumbnail beside it with the tissue mask outlined, to check what was read."""
    fig = _figure(10.0, max(2.5, 5.0 * thumb.shape[0] / thumb.shape[1] + 0.8))
    left, right = fig.subplots(1, 2)
    thumb, mask = _for_display(thumb, 5.0), _for_display(mask, 5.0)
    left.imshow(thumb)
    left.set_title("thumbnail")
    right.imshow(thumb)
    right.imshow(np.ma.masked_where(mask, np.ones(mask.shape)), cmap="Greys", vmin=0, vmax=1,
                 alpha=0.6, interpolation="nearest")
    right.contour(mask, levels=[0.5], colors=[ACCENT_COLOR], linewidths=1)
    right.set_title("tissue (glass greyed)")
    for ax in (left, right):
        ax.set_axis_off()
    fig.suptitle(title)
    return fig


def plot_tile_gallery(images: list, probs, xy, *, title: str = "", columns: int = 4) -> Figure:
    """Tiles in a grid, each labelled with its P(tumour) and level-0 position (one image
    panel: sixteen small axes would cost more to lay out than everything else)."""
    columns = max(1, min(columns, len(images)))
    rows = max(1, math.ceil(len(images) / columns))
    fig = _figure(2.0 * columns, 2.3 * rows + 0.4)
    ax = fig.subplots()
    ax.set_axis_off()
    fig.suptitle(title)
    if not images:
        ax.text(0.5, 0.5, "no tissue tiles", ha="center", va="center")
        return fig
    tiles = [np.asarray(img) for img in images]
    side = max(max(t.shape[:2]) for t in tiles)
    gap, band = side // 12, side // 3  # white between tiles; room for each label
    cell_w, cell_h = side + gap, side + band
    mosaic = np.full((rows * cell_h, columns * cell_w - gap, 3), 255, np.uint8)
    for k, (tile, p, (x, y)) in enumerate(zip(tiles, probs, xy)):
        r, c = divmod(k, columns)
        top, left = r * cell_h + band, c * cell_w
        mosaic[top:top + tile.shape[0], left:left + tile.shape[1]] = tile[..., :3]
        ax.text(left + side / 2, top - band * 0.1, f"P={p:.3f}\n({x}, {y})", ha="center",
                va="bottom", fontsize=8)
    ax.imshow(mosaic, interpolation="nearest")
    return fig

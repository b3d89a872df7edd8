"""Figures of single predictions, for `bcd predict --plot` and the notebook."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .inference import Prediction


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
            ``fig.savefig(path)`` or show it with ``display(fig)``.

    Returns:
        The figure drawn into.
    """
    from matplotlib.figure import Figure

    from .data.datasets import open_rgb

    picture = open_rgb(image, max_pixels=None)
    if ax is None:
        # The image panel takes the picture's aspect, so wide images leave no blank band.
        image_height = 5.0 * picture.height / picture.width
        fig = Figure(figsize=(5, image_height + 1.6), layout="constrained")
        img_ax, bar_ax = fig.subplots(2, 1, gridspec_kw={"height_ratios": [image_height, 1.2]})
    else:
        img_ax, bar_ax = ax
        fig = img_ax.figure
    img_ax.imshow(picture)
    if prediction.heatmap is not None:
        w, h = picture.size
        img_ax.imshow(prediction.heatmap, extent=(0, w, h, 0), cmap="RdYlGn_r", vmin=0,
                      vmax=1, alpha=0.3, interpolation="nearest")
    img_ax.set_axis_off()
    title = prediction.label
    if np.isfinite(prediction.p_malignant):
        title += f"  (P(malignant) = {prediction.p_malignant:.3f})"
    img_ax.set_title(title)

    classes = list(prediction.probabilities)
    probs = [prediction.probabilities[c] for c in classes]
    bars = bar_ax.barh(classes, probs, color=["tab:green", "tab:red"][: len(classes)])
    bar_ax.bar_label(bars, labels=[f"{p:.3f}" for p in probs], padding=3)
    bar_ax.set_xlim(0, 1.15)
    bar_ax.set_xlabel("probability")
    bar_ax.invert_yaxis()  # classes read top to bottom in their own order
    return fig


def plot_sample_grid(index, root, *, per_cell: int = 1, seed: int = 0) -> Figure:
    """A grid of example images: one row per class, one column per magnification.

    Args:
        index: Table from ``build_index`` (its ``path`` relative to ``root``).
        root: The data folder.
        per_cell: Images per class x magnification cell, side by side.
        seed: Which images are picked.
    """
    from pathlib import Path

    from matplotlib.figure import Figure

    from .data.breakhis import CLASSES
    from .data.datasets import open_rgb

    mags = sorted((m for m in index["magnification"].unique() if m), key=lambda m: int(m[:-1]))
    mags = mags or [""]
    cols = len(mags) * per_cell
    fig = Figure(figsize=(2.4 * cols, 2.0 * len(CLASSES) + 0.4), layout="constrained")
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
    from matplotlib.figure import Figure

    m = pd.read_csv(metrics) if not isinstance(metrics, pd.DataFrame) else metrics
    fig = Figure(figsize=(11, 3.2), layout="constrained")
    ax_loss, ax_acc, ax_auc = fig.subplots(1, 3)
    for ax, key, title in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        for subset in ("train", "val"):
            col = f"{subset}_{key}"
            if col in m:
                ax.plot(m["epoch"], m[col], marker="o", label=subset)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    if "val_auc" in m:
        ax_auc.plot(m["epoch"], m["val_auc"], marker="o", color="tab:green")
    ax_auc.set_title("validation ROC AUC")
    ax_auc.set_xlabel("epoch")
    return fig

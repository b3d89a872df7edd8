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

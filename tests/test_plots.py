"""Every figure returns a Figure in the one palette; save_figure writes and closes it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from PIL import Image

from breast_cancer_detection import plots
from breast_cancer_detection.inference import Prediction
from breast_cancer_detection.metrics import evaluate_predictions, image_metrics, roc_auc


def _scores(n: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and P(malignant) that separate the classes well but not perfectly."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(0.3 * y + 0.35 + rng.normal(0, 0.2, n), 0, 1)


def _prediction(heatmap: np.ndarray | None = None) -> Prediction:
    return Prediction(source="<image 0>", probabilities={"benign": 0.3, "malignant": 0.7},
                      label="malignant", threshold=0.5, heatmap=heatmap)


def _image(h: int = 40, w: int = 60) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _by_magnification() -> dict[str, dict]:
    out = {}
    for k, mag in enumerate(("40X", "400X")):
        y, p = _scores(seed=k)
        df = pd.DataFrame({"target": y, "probability": p,
                           "patient": [f"p{i % 6}" for i in range(len(y))]})
        out[mag] = evaluate_predictions(df, 0.5)
    return out


def _report_figures() -> dict[str, Figure]:
    y, p = _scores()
    metrics = evaluate_predictions(pd.DataFrame({"target": y, "probability": p}), 0.5)
    return {
        "roc": plots.plot_roc(y, p, threshold=0.5),
        "pr": plots.plot_pr(y, p, threshold=0.5),
        "confusion": plots.plot_confusion(metrics["image"]["confusion_matrix"]),
        "reliability": plots.plot_reliability(metrics["calibration"]["reliability"],
                                              ece=metrics["calibration"]["ece"]),
        "per_magnification": plots.plot_per_magnification(_by_magnification()),
    }


@pytest.mark.slow
def test_save_figure_writes_the_file_at_the_one_dpi(tmp_path):
    for name, fig in _report_figures().items():
        assert isinstance(fig, Figure), name
        width, height = fig.get_size_inches()
        path = plots.save_figure(fig, str(tmp_path / "new" / f"{name}.png"))
        assert path == tmp_path / "new" / f"{name}.png"
        with Image.open(path) as im:
            assert im.format == "PNG"
            assert im.size == (round(width * plots.DPI), round(height * plots.DPI))


def test_save_figure_closes_a_figure_drawn_through_pyplot(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, axes = plt.subplots(2, 1)
    assert plots.plot_prediction(_image(), _prediction(), ax=tuple(axes)) is fig
    assert plt.fignum_exists(fig.number)
    plots.save_figure(fig, tmp_path / "pred.png")
    assert (tmp_path / "pred.png").is_file()
    assert not plt.fignum_exists(fig.number)


def test_roc_draws_curves_and_the_operating_point():
    y, p = _scores()
    patients = (np.array([0, 0, 1, 1, 1]), np.array([0.2, 0.6, 0.4, 0.7, 0.9]))
    fig = plots.plot_roc(y, p, threshold=0.5, patient_curve=patients)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    images = next(v for k, v in lines.items() if k.startswith("images"))
    assert f"AUC {roc_auc(y, p):.3f}" in images.get_label()
    assert to_hex(images.get_color()) == plots.MALIGNANT_COLOR
    point = next(v for k, v in lines.items() if k.startswith("threshold"))
    m = image_metrics(y, p, 0.5)
    np.testing.assert_allclose(point.get_xydata(), [[1 - m["specificity"], m["sensitivity"]]])
    per_patient = next(v for k, v in lines.items() if k.startswith("patients"))
    assert to_hex(per_patient.get_color()) == plots.ACCENT_COLOR
    assert "AUC 0.833" in per_patient.get_label()  # 5 of the 6 pairs in order


def test_undefined_curves_say_so_instead_of_drawing():
    y = np.zeros(10, dtype=int)
    p = np.linspace(0, 1, 10)
    roc, pr = plots.plot_roc(y, p, threshold=0.5), plots.plot_pr(y, p, threshold=0.5)
    assert "ROC undefined" in " ".join(t.get_text() for t in roc.axes[0].texts)
    assert "PR curve undefined" in " ".join(t.get_text() for t in pr.axes[0].texts)
    assert [line.get_label() for line in roc.axes[0].get_lines()] == ["chance"]
    assert pr.axes[0].get_legend() is None  # an empty legend box would only warn


def test_every_plot_draws_in_the_one_palette():
    palette = {plots.MALIGNANT_COLOR, plots.BENIGN_COLOR, plots.ACCENT_COLOR}
    fig = plots.plot_prediction(_image(), _prediction(heatmap=np.array([[0.1, 0.9]])))
    img_ax, bar_ax = fig.axes[:2]
    assert [to_hex(b.get_facecolor()) for b in bar_ax.patches] == [plots.BENIGN_COLOR,
                                                                   plots.MALIGNANT_COLOR]
    assert img_ax.images[1].get_cmap().name == plots.HEATMAP_CMAP

    history = pd.DataFrame({"epoch": [1, 2], "train_loss": [0.7, 0.5], "val_loss": [0.8, 0.6],
                            "train_acc": [0.6, 0.7], "val_acc": [0.5, 0.6],
                            "val_auc": [0.6, 0.7]})
    lines = [line for ax in plots.plot_history(history).axes for line in ax.get_lines()]
    assert len(lines) == 5 and {to_hex(line.get_color()) for line in lines} <= palette

    figs = _report_figures()
    confusion = figs["confusion"].axes[0].images[0]
    assert confusion.get_cmap().name == plots.SHARE_CMAP
    bars = figs["per_magnification"].axes[0].containers
    assert [to_hex(c.patches[0].get_facecolor()) for c in bars] == list(
        plots.SERIES_COLORS[:len(bars)])
    reliability = figs["reliability"].axes[0]
    assert to_hex(reliability.patches[0].get_facecolor()) == plots.BENIGN_COLOR


def test_figures_show_as_pictures_in_jupyter():
    """display(fig) in a notebook: IPython's formatter must find a PNG, not only text."""
    formatters = pytest.importorskip("IPython.core.formatters")
    from breast_cancer_detection.plots import plot_confusion

    data, _ = formatters.DisplayFormatter().format(plot_confusion([[5, 1], [2, 7]]))
    assert data["image/png"][:8] == b"\x89PNG\r\n\x1a\n"


def test_an_explanation_keeps_the_aspect_and_has_a_colour_bar():
    from breast_cancer_detection.plots import plot_explanation

    view = np.zeros((46, 70, 3), np.uint8)
    cam = np.linspace(0, 1, 46 * 70, dtype=np.float32).reshape(46, 70)
    fig = plot_explanation(view, cam, title="Grad-CAM: malignant")
    image_axes = [a for a in fig.axes if a.images]
    assert len(image_axes) == 2  # the view, and the map over it
    overlay = next(a for a in image_axes if a.get_title() == "Grad-CAM: malignant")
    x0, x1 = overlay.get_xlim()
    y0, y1 = overlay.get_ylim()
    assert abs(x1 - x0) / abs(y0 - y1) == pytest.approx(70 / 46, rel=0.02)
    bar = next(a for a in fig.axes if a not in (overlay,) and "evidence" in a.get_ylabel())
    assert bar.get_ylim() == pytest.approx((0.0, 1.0))


def _threshold_lines(ax) -> list:
    return [line for line in ax.get_lines() if line.get_gid() == "threshold"]


def test_the_probability_bars_mark_the_threshold_that_decided_the_label():
    p = Prediction(source="<image 0>", probabilities={"benign": 0.2, "malignant": 0.8},
                   label="benign", threshold=0.8765)
    fig = plots.plot_prediction(_image(), p)
    bars = next(a for a in fig.axes if a.containers)
    (line,) = _threshold_lines(bars)
    assert line.get_xdata()[0] == pytest.approx(0.8765)
    assert "threshold 0.8765" in bars.get_legend().get_texts()[0].get_text()


def test_a_tiled_prediction_has_a_colour_bar_with_the_threshold():
    p = _prediction(heatmap=np.array([[0.1, 0.9], [0.4, 0.6]]))
    fig = plots.plot_prediction(_image(), p)
    bar = next(a for a in fig.axes if "P(malignant)" in a.get_ylabel())
    assert "threshold 0.500" in bar.get_ylabel()
    assert _threshold_lines(bar)[0].get_ydata()[0] == pytest.approx(0.5)
    picture = next(a for a in fig.axes if a.images)
    assert picture.images[1].get_cmap().name == plots.HEATMAP_CMAP


def test_heat_maps_use_colour_blind_safe_scales():
    # Red-green scales are unreadable with the commonest colour blindness.
    assert plots.HEATMAP_CMAP in ("cividis", "viridis") and plots.CAM_CMAP in ("cividis",
                                                                                "viridis")


def test_an_explanation_says_what_is_uncoloured():
    cam = np.full((46, 70), np.nan, np.float32)
    cam[5:41, 17:53] = 0.5  # the centre square the model saw
    fig = plots.plot_explanation(np.zeros((46, 70, 3), np.uint8), cam)
    texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert texts == ["no colour: a part no model input showed"]
    full = plots.plot_explanation(np.zeros((46, 70, 3), np.uint8), np.zeros((46, 70)))
    assert not full.legends  # nothing unseen: no legend to read


def test_a_slide_heat_map_explains_its_uncoloured_tissue_and_marks_the_threshold():
    thumb = np.full((50, 80, 3), 230, np.uint8)
    heat = np.array([[0.2, np.nan], [0.9, 0.4]])
    fig = plots.plot_slide_heatmap(thumb, heat, (80, 50), threshold=0.6)
    ax = next(a for a in fig.axes if a.images)
    assert "not scored" in ax.get_legend().get_texts()[0].get_text()
    assert ax.images[1].get_cmap().name == plots.HEATMAP_CMAP
    bar = next(a for a in fig.axes if "P(tumour)" in a.get_ylabel())
    assert _threshold_lines(bar)[0].get_ydata()[0] == pytest.approx(0.6)

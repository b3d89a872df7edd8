"""What a model is for, and answers that say when an image lies outside it: the card's own
words on every door, a warning decided from what can be measured, one label whatever is
asked, and tiled Grad-CAMs without seams."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from breast_cancer_detection.cli import main
from breast_cancer_detection.data.transforms import Preprocessing
from breast_cancer_detection.explain import explain
from breast_cancer_detection.inference import Predictor
from breast_cancer_detection.pretrained import trained_model
from breast_cancer_detection.scope import SCALE_TOLERANCE

from conftest import need_module

BREAKHIS_NAME = "SOB_M_DC-14-2523-400-012.png"


def _tissue(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(60, 230, (h, w, 3), np.uint8))


@pytest.fixture(scope="module")
def pcam() -> Predictor:
    return Predictor.from_pretrained("pcam-patch-cnn", device="cpu")


@pytest.fixture(scope="module")
def breakhis() -> Predictor:
    return Predictor.from_pretrained("breakhis-patch-cnn", device="cpu")


# ----------------------------------------------------------------------------- the card


def test_a_named_model_states_its_own_card(pcam, breakhis):
    for model in (pcam, breakhis):
        entry = trained_model(model.model_name)
        assert model.scope() == {"intended_use": entry.intended_use, "not_for": entry.not_for}
    assert "BreakHis" in pcam.scope()["not_for"]  # the PCam card denies BreakHis use


def test_the_web_card_shows_the_loaded_models_scope_and_no_invented_patients(pcam):
    need_module("fastapi", 'pip install -e ".[app]"')
    from breast_cancer_detection.app.server import model_card

    card = model_card(pcam)
    assert card["intended_use"] == pcam.scope()["intended_use"]
    assert card["not_for"] == pcam.scope()["not_for"]
    assert "BreakHis" not in card["intended_use"]
    # PCam has no patient ids: no "train 0, val 0" patient counts.
    assert card["training"]["patients"] == {}
    assert "cut instead into 96 px tiles" in card["preprocessing"]["description"]


# ----------------------------------------------------------------------------- warnings


def test_the_api_warns_by_the_uploads_name_and_size(pcam):
    need_module("fastapi", 'pip install -e ".[app]"')
    import io

    from fastapi.testclient import TestClient

    from breast_cancer_detection.app import create_app

    client = TestClient(create_app(pcam, backend="torch"), base_url="http://127.0.0.1")
    buf = io.BytesIO()
    _tissue(96, 96).save(buf, format="PNG")
    patch = buf.getvalue()
    r = client.post("/api/predict", files=[("files", (BREAKHIS_NAME, patch, "image/png")),
                                           ("files", ("patch.png", patch, "image/png"))])
    assert r.status_code == 200, r.text
    named, plain = r.json()["results"]
    assert "BreakHis breast biopsy by its name (400X)" in named["warning"]
    assert plain["warning"] is None and plain["p_malignant"] == named["p_malignant"]


def test_a_renamed_biopsy_cut_into_tiles_with_no_scale_is_warned(pcam, tmp_path):
    image = tmp_path / "biopsy1.png"
    _tissue(460, 700).save(image)
    (p,) = pcam.predict(image)
    assert p.tiles == 126 and p.error is None
    assert p.warning.startswith("cut into 126 tiles of 96 px, read at an assumed 0.972 um/px")
    assert "--mpp" in p.warning
    (same,) = pcam.predict(image, mpp=0.972 * 1.1)  # a stated scale within tolerance
    assert same.warning is None and same.p_malignant == p.p_malignant
    (far,) = pcam.predict(image, mpp=0.25)
    assert "0.25 um/px (--mpp), is 0.26 times" in far.warning
    with pytest.raises(Exception, match="positive number"):
        pcam.predict(image, mpp=float("inf"))


def test_a_patch_at_the_models_scale_gets_no_warning(pcam):
    (p,) = pcam.predict(_tissue(96, 96))
    assert p.tiles == 1 and p.warning is None


def test_breakhis_names_warn_a_model_of_other_tissue(pcam, breakhis, tmp_path):
    image = tmp_path / BREAKHIS_NAME
    _tissue(460, 700).save(image)
    (p,) = pcam.predict(image)
    assert "BreakHis breast biopsy by its name (400X)" in p.warning
    assert "--model breakhis-patch-cnn" in p.warning
    (b,) = breakhis.predict(image)  # a BreakHis image to the BreakHis model: in scope
    assert b.tiles == 1 and b.warning is None


def test_the_breakhis_model_warns_of_images_unlike_its_fields_of_view(breakhis):
    big, small = breakhis.predict([_tissue(920, 1400), _tissue(150, 200)])
    assert big.tiles > 1 and "at its own pixel size, assumed" in big.warning
    assert small.tiles == 1 and "enlarged 1.7 times to its 256 px input" in small.warning
    (near,) = breakhis.predict(_tissue(int(256 / SCALE_TOLERANCE) + 2, 300))
    assert near.warning is None  # enlarged less than the tolerance


def test_a_model_trained_on_some_magnifications_warns_of_the_others(trained, tmp_path):
    from breast_cancer_detection.checkpoint import load_checkpoint

    model = Predictor.from_loaded(load_checkpoint(trained), device="cpu")
    model.checkpoint.magnification = ["40X"]
    image = tmp_path / BREAKHIS_NAME
    _tissue(46, 70).save(image)
    (p,) = model.predict(image)
    assert p.warning == ("a 400X BreakHis image by its name; the model was trained on 40X "
                         "only.")


def test_cli_table_and_csv_carry_the_warning_model_and_backend(tmp_path, capsys):
    inside, outside = tmp_path / "patch.png", tmp_path / "biopsy1.png"
    _tissue(96, 96).save(inside)
    _tissue(460, 700).save(outside)
    out = tmp_path / "p.csv"
    assert main(["predict", str(inside), str(outside), "--model", "pcam-patch-cnn", "--out",
                 str(out), "--quiet"]) == 0
    stdout, stderr = capsys.readouterr()
    rows = {line.split()[0]: line for line in stdout.splitlines()[1:3]}
    assert rows["biopsy1.png"].endswith("! outside the model's scope")
    assert "!" not in rows["patch.png"]
    assert "2 images:" in stdout and "WARNING: 1 image outside what pcam-patch-cnn" in stderr
    table = pd.read_csv(out, keep_default_na=False)
    assert table["model"].tolist() == ["pcam-patch-cnn"] * 2
    assert table["backend"].iloc[0].startswith(("ONNX Runtime", "PyTorch"))
    assert table.set_index("file")["warning"].ne("").to_dict() == {str(inside): False,
                                                                   str(outside): True}
    # Six significant digits, not 17: what a probability carries.
    for line in out.read_text().splitlines()[1:]:
        p_benign = line.split(",")[2]
        assert len(p_benign.replace("0.", "", 1).lstrip("0")) <= 6, line


def test_one_image_is_one_image(tmp_path, capsys):
    image = tmp_path / "patch.png"
    _tissue(96, 96).save(image)
    assert main(["predict", str(image), "--model", "pcam-patch-cnn", "--out",
                 str(tmp_path / "p.csv"), "--quiet"]) == 0
    assert "\n1 image: " in capsys.readouterr().out


def test_the_cli_says_the_models_intended_use_and_not_for(tmp_path, capsys):
    image = tmp_path / "patch.png"
    _tissue(96, 96).save(image)
    assert main(["predict", str(image), "--model", "pcam-patch-cnn", "--out",
                 str(tmp_path / "p.csv")]) == 0
    err = capsys.readouterr().err
    scope = trained_model("pcam-patch-cnn")
    assert f"Intended use: {scope.intended_use}" in err and f"Not for: {scope.not_for}" in err


# ----------------------------------------------------------------------------- one label


def test_asking_for_grad_cam_does_not_change_the_answer(tmp_path, capsys):
    need_module("onnxruntime", 'pip install -e ".[onnx]"')
    image = tmp_path / "patch.png"
    _tissue(96, 96, seed=3).save(image)
    plain, cams = tmp_path / "plain.csv", tmp_path / "cams.csv"
    args = ["predict", str(image), "--model", "pcam-patch-cnn"]
    assert main([*args, "--out", str(plain)]) == 0
    assert main([*args, "--out", str(cams), "--cam", str(tmp_path / "cam")]) == 0
    err = capsys.readouterr().err
    a, b = pd.read_csv(plain), pd.read_csv(cams)
    assert a["backend"].iloc[0].startswith("ONNX Runtime")  # scored on the faster backend
    pd.testing.assert_frame_equal(a, b)  # same backend, same label, same digits
    assert "Grad-CAM is computed with PyTorch and explains that label" in err
    assert (tmp_path / "cam" / "patch-cam.png").stat().st_size


# ----------------------------------------------------------------------------- seams


def test_tiled_grad_cam_blends_its_tiles_without_seams(monkeypatch):
    """Each tile's map is a constant of its own (the tile's mean): averaged with equal
    weights, the map would jump where one tile ends inside another; blended with weights
    that fall to the tile edges, neighbouring pixels stay close."""

    class TileMeans:
        def __init__(self, model, layer=None):
            pass

        def __call__(self, x, target, normalize=True):
            means = x.float().mean(dim=(1, 2, 3))
            return means[:, None, None].expand(-1, *x.shape[-2:]).numpy().copy()

    # The module (bcd.explain is the function of the same name).
    monkeypatch.setattr(sys.modules[explain.__module__], "GradCAM", TileMeans)
    pre = Preprocessing(size=32, resize=None, mean=(0.0,) * 3, std=(1.0,) * 3)
    pred = Predictor(torch.nn.Conv2d(3, 2, 1), pre, device="cpu", channels_last=False)
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 255, (6, 8, 3), np.uint8)
    image = np.kron(blocks, np.ones((24, 24, 1), np.uint8))  # 144 x 192, 24 px blocks
    view, cam = explain(pred, image, target=1)
    assert cam.shape == (144, 192) and np.isfinite(cam).all()
    steps = max(np.abs(np.diff(cam, axis=0)).max(), np.abs(np.diff(cam, axis=1)).max())
    assert steps < 0.15, steps  # equal weights: jumps of 0.3 and more


# ----------------------------------------------------------------------------- demo slide


@pytest.mark.slow
def test_demo_slide_from_the_sample_patches_lights_up_its_tumour_disc(tmp_path, capsys):
    need_module("openslide", 'pip install -e ".[slides]"')
    need_module("tifffile", 'pip install -e ".[slides]"')
    assert main(["demo-slide", str(tmp_path)]) == 0
    said = capsys.readouterr().out
    assert f"{tmp_path / 'demo.tif'}: 12 tumour cells in a disc" in said
    assert main(["slide", str(tmp_path / "demo.tif"), "--out", str(tmp_path / "out"),
                 "--quiet"]) == 0
    assert "1 slide, 0 failed" in capsys.readouterr().out
    tiles = pd.read_csv(tmp_path / "out" / "demo" / "tiles.csv")
    # 16 x 20 cells of 192 level-0 px; the disc: cells within 1.95 cells of the centre.
    cells = np.hypot(tiles["x"] + 96 - 20 * 96, tiles["y"] + 96 - 16 * 96) / 192
    hot = tiles["p_malignant"] >= 0.4333
    assert hot[cells <= 1.95].mean() > 0.8 and hot[cells > 2.5].mean() < 0.05


# ----------------------------------------------------------------------------- install hints


def test_install_hints_name_our_pypi_distribution_and_the_clone_command():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from pathlib import Path

    from breast_cancer_detection.errors import DISTRIBUTION, install_hint
    from breast_cancer_detection.slides.reader import INSTALL_HINT

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION != "breast-cancer-detection"  # that one is taken
    assert install_hint("slides") == ('pip install "bcd-histopathology[slides]" (in a clone: '
                                      'pip install -e ".[slides]")')
    assert install_hint("slides") in INSTALL_HINT
    # No message, help text or doc sends anyone to the unrelated project's name.
    for path in [*root.glob("src/**/*.py"), *root.glob("*.md"), *root.glob("docs/*.md"),
                 root / "tools" / "make_notebook.py"]:
        assert "breast-cancer-detection[" not in path.read_text(), path
        assert "install -U breast-cancer-detection" not in path.read_text(), path


def test_an_undefined_auc_reads_as_such_not_as_zero():
    from breast_cancer_detection.engine import epoch_line

    row = {"epoch": 1, "train_loss": 0.7, "train_acc": 0.5, "val_loss": 0.69, "val_acc": 1.0,
           "val_auc": float("nan"), "images_per_s": 10.0, "seconds": 1.0}
    assert "auc n/a: one class" in epoch_line(row, 2, True)
    assert "auc 0.000" in epoch_line({**row, "val_auc": 0.0}, 2, True)


def test_a_file_name_a_spreadsheet_would_run_is_written_as_text(tmp_path, monkeypatch):
    image = tmp_path / "=cmd|calc.png"
    _tissue(96, 96).save(image, format="PNG")
    out = tmp_path / "p.csv"
    monkeypatch.chdir(tmp_path)  # a relative name, as a user would type it
    assert main(["predict", "=cmd|calc.png", "--model", "pcam-patch-cnn", "--out", str(out),
                 "--quiet"]) == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert table["file"].tolist() == ["'=cmd|calc.png"]
    assert 0 <= table["p_malignant"].iloc[0] <= 1  # numbers stay numbers


def test_an_infinite_scale_is_refused_with_the_flag_named(tmp_path, capsys):
    image = tmp_path / "patch.png"
    _tissue(96, 96).save(image)
    assert main(["predict", str(image), "--mpp", "inf", "--out", str(tmp_path / "p.csv")]) == 2
    assert "--mpp inf: a positive number" in capsys.readouterr().err

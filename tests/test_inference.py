"""Predictor: loading (also from URLs), predicting images, TTA, tiling, bad input, the CLI."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from breast_cancer_detection.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from breast_cancer_detection.cli import main
from breast_cancer_detection.data.breakhis import build_index
from breast_cancer_detection.data.datasets import open_rgb
from breast_cancer_detection.data.transforms import dihedral
from breast_cancer_detection.errors import UserError
from breast_cancer_detection.inference import (
    Prediction,
    Predictor,
    collect_images,
    predictions_frame,
    summarize_patients,
)
from breast_cancer_detection.plots import plot_prediction

from conftest import png_claiming, serve_files


def _tissue(h: int, w: int, malignant: bool, seed: int = 0) -> Image.Image:
    # The colours of conftest's fake BreakHis images, which the tiny model learned.
    base = np.array([120, 60, 140]) if malignant else np.array([230, 170, 210])
    arr = base + np.random.default_rng(seed).integers(-25, 25, size=(h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _with_threshold(src: Path, dst: Path, threshold: float) -> Path:
    ckpt = load_checkpoint(src)
    ckpt.threshold = threshold
    save_checkpoint(ckpt, dst)
    return dst


# ----------------------------------------------------------------------------- predicting


def test_predict_table_matches_single_predictions(predictor, fake_breakhis):
    assert predictor.threshold == 0.5 and "default" in predictor.threshold_source
    index = build_index(fake_breakhis).iloc[:10]
    table = predictor.predict_table(fake_breakhis, index, batch_size=4, progress=False)
    assert table["error"].eq("").all()
    singles = predictor.predict([fake_breakhis / p for p in index["path"]], batch_size=3)
    np.testing.assert_allclose(table["probability"], [s.p_malignant for s in singles], atol=1e-5)
    assert all(abs(sum(s.probabilities.values()) - 1) < 1e-5 for s in singles)
    assert [s.label for s in singles] == [
        "malignant" if p >= 0.5 else "benign" for p in table["probability"]]
    assert {s.tiles for s in singles} == {1} and all(s.heatmap is None for s in singles)


def test_predict_accepts_pil_and_arrays_and_reports_bad_files(predictor, fake_breakhis,
                                                              tmp_path):
    path = sorted(fake_breakhis.rglob("*.png"))[0]
    im = Image.open(path).convert("RGB")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    out = predictor.predict([path, im, np.asarray(im), bad])
    assert out[0].p_malignant == pytest.approx(out[1].p_malignant, abs=1e-6)
    assert out[0].p_malignant == pytest.approx(out[2].p_malignant, abs=1e-6)
    assert [o.source for o in out[1:3]] == ["<image 1>", "<image 2>"]
    assert out[3].error and "bad.png" in out[3].error and np.isnan(out[3].p_malignant)
    assert out[3].label == "error" and out[3].tiles == 0
    index = build_index(fake_breakhis).iloc[:3].copy()
    (tmp_path / "t").mkdir()
    for p in index["path"]:
        dst = tmp_path / "t" / p
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((fake_breakhis / p).read_bytes())
    (tmp_path / "t" / index["path"].iloc[1]).write_bytes(b"")
    table = predictor.predict_table(tmp_path / "t", index, progress=False)
    assert table["error"].ne("").tolist() == [False, True, False]
    assert table["prediction"].iloc[1] == -1 and np.isnan(table["probability"].iloc[1])


def test_label_follows_the_stored_threshold(trained, fake_breakhis, tmp_path):
    files = sorted(fake_breakhis.rglob("*.png"))[::4]
    p = np.array([o.p_malignant for o in Predictor.from_checkpoint(trained).predict(files)])
    # A threshold between the predictions, so that 0.5 and it disagree on some images.
    threshold = float(np.sort(p)[len(p) // 2])
    pred = Predictor.from_checkpoint(_with_threshold(trained, tmp_path / "t.pt", threshold))
    assert pred.threshold == threshold and pred.threshold_source == "chosen on validation"
    out = pred.predict(files)
    assert [o.threshold for o in out] == [threshold] * len(files)
    assert [o.label for o in out] == ["malignant" if v >= threshold else "benign" for v in p]
    assert {o.label for o in out} == {"benign", "malignant"}


def test_tta_averages_the_eight_flips_and_turns(predictor):
    image = _tissue(40, 40, malignant=True)
    image.putpixel((3, 30), (255, 255, 255))  # break the symmetry
    image = Image.fromarray(np.asarray(image).copy())
    x = predictor.transform(image).unsqueeze(0)
    with torch.no_grad():
        views = [torch.softmax(predictor.model(dihedral(x, k)), 1) for k in range(8)]
    expected = torch.cat(views).mean(0).numpy()
    plain, tta = predictor.predict(image)[0], predictor.predict(image, tta=True)[0]
    np.testing.assert_allclose(list(tta.probabilities.values()), expected, atol=1e-5)
    assert abs(plain.p_malignant - tta.p_malignant) > 1e-6
    # 40 px is the eval resize: a quarter turn commutes with the centre crop, so the TTA
    # answer must not change while the plain one does.
    turned = image.transpose(Image.Transpose.ROTATE_90)
    assert predictor.predict(turned, tta=True)[0].p_malignant == pytest.approx(
        tta.p_malignant, abs=1e-5)
    assert abs(predictor.predict(turned)[0].p_malignant - plain.p_malignant) > 1e-6


def test_table_tta_agrees_with_single_image_tta(predictor, fake_breakhis):
    from breast_cancer_detection.data.breakhis import build_index

    index = build_index(fake_breakhis).iloc[:6]
    table = predictor.predict_table(fake_breakhis, index, tta=True, progress=False)
    singles = predictor.predict([fake_breakhis / p for p in index["path"]], tta=True)
    np.testing.assert_allclose(table["probability"], [p.p_malignant for p in singles],
                               atol=1e-5)
    plain = predictor.predict_table(fake_breakhis, index, progress=False)
    assert np.abs(plain["probability"] - table["probability"]).max() > 1e-6


@pytest.mark.slow
def test_large_images_are_tiled_with_a_heat_map(predictor):
    # Left half malignant-looking, right half benign; the tile side is the eval resize (40).
    big = np.concatenate([np.asarray(_tissue(110, 85, True, 1)),
                          np.asarray(_tissue(110, 85, False, 2))], axis=1)
    out = predictor.predict(big)[0]
    # 110x170 with stride 20: rows at 0..60 then 70 (flush with the bottom), columns at
    # 0..120 then 130.
    assert out.tiles == 5 * 8 and out.heatmap.shape == (5, 8)
    assert out.p_malignant == pytest.approx(float(out.heatmap.mean()), abs=1e-6)
    for (r, c), y, x in (((0, 0), 0, 0), ((4, 7), 70, 130), ((3, 6), 60, 120), ((1, 3), 20, 60)):
        tile = predictor.predict(big[y:y + 40, x:x + 40], tile_factor=None)[0]
        assert out.heatmap[r, c] == pytest.approx(tile.p_malignant, abs=1e-5)
    assert out.heatmap[:, :2].min() > out.heatmap[:, -2:].max()
    whole = predictor.predict(big, tile_factor=None)[0]
    assert whole.tiles == 1 and whole.heatmap is None
    # Below the factor (min side 80 = 2 tiles) an image is resized, as in training.
    assert predictor.predict(big[:80])[0].tiles == 1
    with pytest.raises(UserError, match="tile_factor=0.5 must be at least 1"):
        predictor.predict(big, tile_factor=0.5)
    tta = predictor.predict(big, tta=True, batch_size=5)[0]
    assert tta.heatmap.shape == (5, 8) and not np.allclose(tta.heatmap, out.heatmap)


def test_a_jpeg_predicted_whole_is_decoded_at_a_reduced_scale(predictor, tmp_path,
                                                              monkeypatch):
    import breast_cancer_detection.inference.prepare as inference

    decoded = []

    def spy(*a, **k):
        image = open_rgb(*a, **k)
        decoded.append(image.size)
        return image

    monkeypatch.setattr(inference, "open_rgb", spy)
    smooth = _tissue(33, 40, True, 3).resize((400, 330), Image.Resampling.BICUBIC)
    smooth.save(tmp_path / "big.jpg", quality=95)
    smooth.save(tmp_path / "big.png")
    # The eval resize is 40 px: 1/8 scale keeps both sides >= 40 (400/8 = 50, 330/8 = 42).
    reduced = predictor.predict(tmp_path / "big.jpg", tile_factor=None)[0]
    assert decoded == [(50, 42)] and reduced.tiles == 1
    whole = predictor.predict(Image.open(tmp_path / "big.jpg"), tile_factor=None)[0]
    assert decoded[-1] == (400, 330)  # an image already opened is taken as it is
    assert reduced.p_malignant == pytest.approx(whole.p_malignant, abs=0.02)
    # Tiles are cut at the image's own scale: a tiled JPEG is decoded whole.
    tiled = predictor.predict(tmp_path / "big.jpg")[0]
    assert decoded[-1] == (400, 330) and tiled.tiles > 1
    predictor.predict(tmp_path / "big.png", tile_factor=None)
    assert decoded[-1] == (400, 330)  # PNG has no reduced decoding


def test_open_rgb_reduces_a_jpeg_only_as_far_as_asked(tmp_path):
    _tissue(300, 500, False).save(tmp_path / "a.jpg")
    seen = []

    def side(w, h):
        seen.append((w, h))
        return 100

    assert open_rgb(tmp_path / "a.jpg", reduced=side).size == (250, 150)  # 1/2: 300 // 100 = 3
    assert seen == [(500, 300)]
    assert open_rgb(tmp_path / "a.jpg", reduced=lambda w, h: 37).size == (63, 38)  # 1/8
    assert open_rgb(tmp_path / "a.jpg", reduced=lambda w, h: 151).size == (500, 300)
    assert open_rgb(tmp_path / "a.jpg", reduced=lambda w, h: None).size == (500, 300)


def test_folders_are_searched_and_batched(predictor, fake_breakhis, tmp_path):
    folder = tmp_path / "in"
    files = sorted(fake_breakhis.rglob("*.png"))[:7]
    for i, f in enumerate(files):
        dst = folder / ("sub" if i % 2 else "") / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"x")
    found = collect_images([folder])
    assert sorted(p.name for p in found) == sorted(f.name for f in files)
    out = predictor.predict(folder, batch_size=3)
    assert [o.source for o in out] == [str(p) for p in found]
    direct = predictor.predict(found, batch_size=32)
    np.testing.assert_allclose([o.p_malignant for o in out], [o.p_malignant for o in direct],
                               atol=1e-6)
    in_worker = predictor.predict([folder], batch_size=2, workers=1)
    assert [o.p_malignant for o in in_worker] == pytest.approx([o.p_malignant for o in out],
                                                               abs=1e-6)
    # A file named explicitly is kept whatever its suffix, so it shows up as an error.
    assert collect_images([folder / "notes.txt"]) == [folder / "notes.txt"]


# ----------------------------------------------------------------------------- bad input


def _png_claiming(path: Path, width: int, height: int) -> Path:
    path.write_bytes(png_claiming(width, height))
    return path


def test_bad_files_give_error_rows_and_the_rest_carry_on(predictor, fake_breakhis, tmp_path):
    good = sorted(fake_breakhis.rglob("*.png"))[:2]
    raw = good[0].read_bytes()
    (tmp_path / "corrupt.png").write_bytes(raw[:40] + bytes(range(256)) * 4)
    (tmp_path / "truncated.png").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.png").write_text("hello")
    bomb = _png_claiming(tmp_path / "bomb.png", 30000, 30000)
    names = ["corrupt.png", "truncated.png", "text.png", "bomb.png"]
    out = predictor.predict([good[0], *(tmp_path / n for n in names), good[1]])
    assert [o.error is None for o in out] == [True, False, False, False, False, True]
    for o, name in zip(out[1:5], names):
        assert name in o.error and o.label == "error" and np.isnan(o.p_malignant)
    assert "truncated" in out[2].error.lower()
    assert "decompression bomb" in out[4].error
    assert bomb.stat().st_size < 200  # refused from the header: nothing was decoded


def test_pixel_limit_is_checked_before_decoding_and_configurable(trained, tmp_path):
    header_only = _png_claiming(tmp_path / "huge.png", 11000, 10000)
    default = Predictor.from_checkpoint(trained).predict(header_only)[0]
    assert "11000x10000" in default.error and "--max-pixels" in default.error
    small = tmp_path / "small.png"
    _tissue(46, 70, True).save(small)
    strict = Predictor.from_checkpoint(trained, max_pixels=3000)
    assert "70x46" in strict.predict(small)[0].error
    assert Predictor.from_checkpoint(trained, max_pixels=3220).predict(small)[0].error is None


def test_image_modes_are_converted_to_rgb(predictor, tmp_path):
    rgb = _tissue(46, 70, True, 3)
    arr = np.asarray(rgb)
    grey = arr.mean(2).astype(np.uint8)
    rgba = np.dstack([arr, np.full(arr.shape[:2], 255, np.uint8)])
    rgba[:20, :30, 3] = 0  # transparent corner: composited on white, like slide background
    white_corner = arr.copy()
    white_corner[:20, :30] = 255
    palette = rgb.quantize(16)
    cases = {
        "grey.png": (Image.fromarray(grey, "L"), np.dstack([grey] * 3)),
        "grey16.png": (Image.fromarray(grey.astype(np.uint16) * 257), np.dstack([grey] * 3)),
        "rgba.png": (Image.fromarray(rgba, "RGBA"), white_corner),
        "palette.png": (palette, np.asarray(palette.convert("RGB"))),
        "cmyk.tif": (rgb.convert("CMYK"), np.asarray(rgb.convert("CMYK").convert("RGB"))),
    }
    for name, (image, _) in cases.items():
        image.save(tmp_path / name)
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    assert Image.open(tmp_path / "cmyk.tif").mode == "CMYK"
    out = predictor.predict([tmp_path / n for n in cases])
    expected = predictor.predict([e for _, e in cases.values()])
    for o, e, name in zip(out, expected, cases):
        assert o.error is None, name
        assert o.p_malignant == pytest.approx(e.p_malignant, abs=1e-5), name
    # The cases differ from each other, so matching each one's own RGB version means something.
    assert len({round(o.p_malignant, 5) for o in out}) >= 4


# ----------------------------------------------------------------------------- patients


def test_patient_summary_groups_breakhis_names():
    rows = [("a/SOB_M_DC-14-2523-40-001.png", 0.9, ""),
            ("b/SOB_M_DC-14-2523-400-002.png", 0.5, ""),
            ("SOB_B_A-14-22549AB-40-001.png", 0.1, ""),
            ("SOB_B_A-14-22549CD-40-003.png", 0.3, ""),
            ("SOB_B_A-14-22549CD-40-004.png", float("nan"), "cannot decode"),
            ("holiday.png", 0.99, "")]
    df = pd.DataFrame([{"file": f, "p_malignant": p, "threshold": 0.6, "error": e}
                       for f, p, e in rows])
    out = summarize_patients(df).set_index("patient")
    assert list(out.index) == ["14-22549", "14-2523"]
    assert out.loc["14-2523", "images"] == 2 and out.loc["14-22549", "images"] == 2
    assert out.loc["14-2523", "p_malignant"] == pytest.approx(0.7)
    assert out.loc["14-22549", "p_malignant"] == pytest.approx(0.2)
    assert out["label"].tolist() == ["benign", "malignant"]
    assert out["name_label"].tolist() == ["benign", "malignant"]
    assert summarize_patients(df, threshold=0.75).set_index("patient").loc[
        "14-2523", "label"] == "benign"
    assert summarize_patients(df[df["file"] == "holiday.png"]).empty


def test_predictions_frame_columns():
    p = Prediction("x.png", {"benign": 0.25, "malignant": 0.75}, "malignant", 0.5)
    bad = Prediction("y.png", {"benign": float("nan"), "malignant": float("nan")}, "error", 0.5,
                     error="cannot decode", tiles=0)
    df = predictions_frame([p, bad])
    assert list(df.columns) == ["file", "label", "p_benign", "p_malignant", "threshold",
                                "tiles", "warning", "error"]
    assert list(predictions_frame([p], model="m", backend="b").columns[-2:]) == ["model",
                                                                                 "backend"]
    assert df["error"].tolist() == ["", "cannot decode"]
    assert df["p_malignant"].iloc[0] == 0.75


# ----------------------------------------------------------------------------- loading


@pytest.fixture
def server(trained):
    with serve_files({"/models/best.pt": trained.read_bytes()}) as handler:
        yield handler


def test_url_checkpoint_is_downloaded_once_and_verified(server, trained, tmp_path):
    digest = hashlib.sha256(trained.read_bytes()).hexdigest()
    url = f"{server.url}/models/best.pt#sha256={digest}"
    first = Predictor.from_checkpoint(url, device="cpu", cache_dir=tmp_path, progress=False)
    assert server.seen == ["/models/best.pt"]
    cached = list((tmp_path / "checkpoints").iterdir())
    assert len(cached) == 1 and cached[0].name.endswith("best.pt")
    assert cached[0].read_bytes() == trained.read_bytes()
    second = Predictor.from_checkpoint(url, device="cpu", cache_dir=tmp_path, progress=False)
    assert server.seen == ["/models/best.pt"]  # the cache answered
    im = _tissue(46, 70, True)
    assert first.predict(im)[0].p_malignant == second.predict(im)[0].p_malignant
    # A cached copy that no longer matches its hash is fetched again.
    cached[0].write_bytes(b"damaged")
    Predictor.from_checkpoint(url, cache_dir=tmp_path, progress=False)
    assert len(server.seen) == 2 and cached[0].read_bytes() == trained.read_bytes()


def test_sha256_mismatch_is_refused_and_the_download_deleted(server, tmp_path, monkeypatch):
    monkeypatch.setenv("BCD_CACHE", str(tmp_path / "env-cache"))
    with pytest.raises(CheckpointError, match="SHA-256 mismatch.*deleted"):
        Predictor.from_checkpoint(f"{server.url}/models/best.pt", sha256="0" * 64,
                                  progress=False)
    assert server.seen == ["/models/best.pt"]
    assert list((tmp_path / "env-cache" / "checkpoints").iterdir()) == []
    with pytest.raises(CheckpointError, match="not a SHA-256"):
        Predictor.from_checkpoint(f"{server.url}/models/best.pt#sha256=abc", progress=False)
    with pytest.raises(CheckpointError, match="two different hashes"):
        Predictor.from_checkpoint(f"{server.url}/models/best.pt#sha256={'1' * 64}",
                                  sha256="2" * 64, progress=False)
    with pytest.raises(CheckpointError, match="HTTP 404"):
        Predictor.from_checkpoint(f"{server.url}/missing.pt", sha256="3" * 64, progress=False)
    # No failed attempt left a file (or a temporary one) behind.
    assert list((tmp_path / "env-cache" / "checkpoints").iterdir()) == []


def test_local_checkpoint_hash_is_checked(trained):
    digest = hashlib.sha256(trained.read_bytes()).hexdigest()
    assert Predictor.from_checkpoint(trained, sha256=digest.upper()).threshold == 0.5
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        Predictor.from_checkpoint(trained, sha256="f" * 64)
    assert trained.is_file()  # the user's own file is never deleted


def test_google_drive_links_go_through_gdown(trained, tmp_path, monkeypatch):
    calls = []

    def download(*, id, output, quiet, resume):  # noqa: A002 - gdown's own keyword
        calls.append(id)
        shutil.copy(trained, output)
        return output

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=download))
    link = "https://drive.google.com/file/d/1AbC-xyz/view?usp=sharing"
    pred = Predictor.from_checkpoint(link, cache_dir=tmp_path, progress=False)
    assert calls == ["1AbC-xyz"] and pred.checkpoint.arch == "tiny"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()][0].endswith("1AbC-xyz.pt")
    monkeypatch.setitem(sys.modules, "gdown", None)  # not installed
    with pytest.raises(CheckpointError, match="pip install gdown"):
        Predictor.from_checkpoint(link.replace("1AbC", "2AbC"), cache_dir=tmp_path)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "bcd-checkpoint/1", "arch": "tiny", "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects.*refused"):
        Predictor.from_checkpoint(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- figures and CLI


def test_plot_prediction_draws_title_and_bars(predictor):
    image = _tissue(46, 70, True)
    pred = predictor.predict(image)[0]
    fig = plot_prediction(image, pred)
    img_ax, bar_ax = fig.axes[:2]
    assert img_ax.get_title().startswith(pred.label)
    widths = [b.get_width() for b in bar_ax.patches]
    np.testing.assert_allclose(widths, list(pred.probabilities.values()))
    assert [t.get_text() for t in bar_ax.get_yticklabels()] == ["benign", "malignant"]


@pytest.mark.slow
def test_cli_predict_writes_csv_figures_cams_and_fails_on_bad_input(trained, fake_breakhis,
                                                                     tmp_path, capsys):
    folder = tmp_path / "images"
    picked = [p for p in sorted(fake_breakhis.rglob("*.png"))
              if "22549AB-40" in p.name or "2523-40-" in p.name][:5]
    folder.mkdir()
    for p in picked:
        shutil.copy(p, folder / p.name)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "res" / "pred.csv"
    rc = main(["predict", str(trained), str(folder), str(bad), "--out", str(out),
               "--plot", str(tmp_path / "plots"), "--cam", str(tmp_path / "cams"),
               "--patients", "--quiet"])
    assert rc == 1
    table = pd.read_csv(out, keep_default_na=False)
    assert len(table) == len(picked) + 1
    assert table["error"].ne("").tolist() == [False] * len(picked) + [True]
    assert set(table["label"]) <= {"benign", "malignant", "error"}
    stdout, stderr = capsys.readouterr()
    assert "P(malignant)" in stdout and picked[0].name in stdout
    assert "FAILED" in stderr and "broken.png" in stderr
    stems = sorted(p.stem for p in picked)
    assert sorted(p.stem for p in (tmp_path / "plots").iterdir()) == stems
    assert sorted(p.stem for p in (tmp_path / "cams").iterdir()) == [s + "-cam" for s in stems]
    assert Image.open(tmp_path / "cams" / f"{stems[0]}-cam.png").size[0] == 960  # a figure
    patients = pd.read_csv(tmp_path / "res" / "pred-patients.csv", dtype={"patient": str})
    assert sorted(patients["patient"]) == ["14-22549", "14-2523"]
    assert main(["predict", str(trained), str(folder), "--out", str(out), "--quiet",
                 "--tta"]) == 0
    capsys.readouterr()
    assert main(["predict", str(trained), str(tmp_path / "missing.png"), "--out", str(out),
                 "--quiet"]) == 2  # nothing to score: said before the model loads
    assert f"no such file or folder: {tmp_path / 'missing.png'}" in capsys.readouterr().err
    assert main(["predict", str(trained), str(picked[0]), str(tmp_path / "missing.png"),
                 "--out", str(out), "--quiet"]) == 1  # one of several: an error row
    assert pd.read_csv(out, keep_default_na=False)["error"].iloc[1] == (
        f"{tmp_path / 'missing.png'}: no such file.")
    assert main(["predict", str(trained), str(tmp_path / "res")]) == 2  # no images at all
    assert "no image files" in capsys.readouterr().err


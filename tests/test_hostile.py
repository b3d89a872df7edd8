"""Files from strangers: bounded cost, refusals that say why, and no silent answers."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torch import nn

from breast_cancer_detection.checkpoint import load_checkpoint, save_checkpoint
from breast_cancer_detection.cli import main
from breast_cancer_detection.data.datasets import (
    ALLOWED_FORMATS,
    ImageError,
    ImageFormatError,
    open_rgb,
)
from breast_cancer_detection.data.transforms import Preprocessing, build_eval_transform
from breast_cancer_detection.explain import explain
from breast_cancer_detection.inference import Predictor

from conftest import jpeg_scan_bomb

SRC = Path(__file__).resolve().parents[1] / "src"


def _tissue(h: int, w: int, seed: int = 0) -> Image.Image:
    arr = np.array([120, 60, 140]) + np.random.default_rng(seed).integers(-25, 25, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- item 1: cost


_MEASURE = """
import json, resource, sys, time
from PIL import Image
from breast_cancer_detection.inference import Predictor

pred = Predictor.from_checkpoint(sys.argv[1], device="cpu")
pred.predict(sys.argv[2])  # warm up: model, allocator and code paths of a normal image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
out = pred.predict(sys.argv[3])[0]
print(json.dumps({"kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before,
                  "s": time.perf_counter() - start, "error": out.error, "label": out.label}))
"""


@pytest.mark.slow
def test_a_thin_png_costs_neither_memory_nor_time(trained, tmp_path):
    # 243 bytes on disk, 0.04 megapixels: passes the pixel limit. Resizing its 1 px short
    # side to the model's scale used to allocate a 40 x 1.6 million pixel image.
    thin = tmp_path / "thin.png"
    Image.new("RGB", (1, 40000)).save(thin)
    normal = tmp_path / "normal.png"
    _tissue(46, 70).save(normal)
    assert thin.stat().st_size < 300
    # A fresh process, so that the peak resident size is this prediction's and nobody else's.
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(trained), str(normal), str(thin)],
                         capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["label"] == "error" and "thin.png" in got["error"]
    assert got["kb"] < 40_000, f"peak memory grew by {got['kb'] / 1024:.0f} MB"
    assert got["s"] < 1.0


def test_the_eval_resize_is_bounded_whatever_the_shape():
    # predict_table and other direct users of the transform get no refusal, but a bound:
    # the long side is cropped to MAX_ASPECT (10) short sides before the resize.
    transform = build_eval_transform(pre=Preprocessing(size=32, resize=40))
    resize = T.Compose(transform.transforms[:2])
    assert resize(Image.new("RGB", (1, 40000))).size == (40, 400)
    assert resize(Image.new("RGB", (20, 200))).size == (40, 400)  # 10:1 is left alone
    assert resize(Image.new("RGB", (70, 46))).size == (60, 40)
    assert transform(Image.new("RGB", (1, 40000))).shape == (3, 32, 32)
    # The centre crop the model sees is the one the unbounded resize gave.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 20, 3), np.uint8))
    unbounded = T.Compose([T.Resize(40, antialias=True), *transform.transforms[2:]])
    np.testing.assert_allclose(transform(image), unbounded(image), atol=1e-6)


def test_extreme_aspect_ratios_are_refused_with_the_ratio_and_the_limit(predictor):
    # 20 px is above the minimum side (16 px for 32 px inputs), so the ratio is what refuses.
    out = predictor.predict([np.zeros((4000, 20, 3), np.uint8), np.zeros((20, 300, 3), np.uint8),
                             np.zeros((20, 200, 3), np.uint8)])
    assert out[0].label == "error" and "200:1" in out[0].error and "10:1" in out[0].error
    assert "15:1" in out[1].error and np.isnan(out[1].p_malignant)
    assert out[2].error is None  # 10:1 exactly is allowed
    # A large image is tiled over its whole area, so its shape costs nothing extra: kept.
    strip = predictor.predict(np.asarray(_tissue(100, 1200)))[0]
    assert strip.error is None and strip.heatmap.shape == (4, 59)


def test_running_out_of_memory_is_an_error_row(trained, tmp_path):
    pred = Predictor.from_checkpoint(trained, device="cpu")

    def exhausted(image):
        raise MemoryError

    pred.transform = exhausted
    out = pred.predict([_tissue(46, 70), _tissue(46, 70, 1)])
    assert [o.label for o in out] == ["error", "error"]
    assert "out of memory" in out[0].error and "70x46" in out[0].error


# ----------------------------------------------------------------------------- item 2: tiny


def test_images_too_small_to_hold_tissue_are_refused(predictor, tmp_path):
    one = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (120, 60, 140)).save(one)
    out = predictor.predict([one, np.zeros((15, 300, 3), np.uint8), _tissue(16, 16)])
    assert out[0].label == "error" and np.isnan(out[0].p_malignant) and out[0].tiles == 0
    # The message gives the minimum (half the model's 32 px input) and the input size.
    assert "one.png" in out[0].error and "16 px" in out[0].error and "32 px" in out[0].error
    assert "15" in out[1].error
    assert out[2].error is None and out[2].label in ("benign", "malignant")


# ----------------------------------------------------------------------------- item 6: NaN


class _NanModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x).mean(dim=(2, 3))
        return out * float("nan")


def test_non_finite_model_output_is_an_error_not_benign():
    pred = Predictor(_NanModel(), Preprocessing(size=32, resize=40), device="cpu")
    out = pred.predict([_tissue(46, 70), np.asarray(_tissue(110, 170))])
    for o in out:
        assert o.label == "error" and "non-finite" in o.error and o.tiles == 0


def test_cli_predict_exits_1_on_a_checkpoint_that_outputs_nan(trained, tmp_path, capsys):
    ckpt = load_checkpoint(trained)
    first = next(k for k, v in ckpt.state_dict.items() if v.is_floating_point())
    ckpt.state_dict[first] = torch.full_like(ckpt.state_dict[first], float("nan"))
    broken = save_checkpoint(ckpt, tmp_path / "nan.pt")
    image = tmp_path / "tissue.png"
    _tissue(46, 70).save(image)
    out = tmp_path / "pred.csv"
    # Where ONNX Runtime is installed, the export refuses the broken weights first (and says
    # why), and PyTorch scores them: the row then says what PyTorch found.
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["predict", str(broken), str(image), "--out", str(out), "--quiet"]) == 1
    onnx = [str(w.message) for w in seen if "ONNX" in str(w.message)]
    if importlib.util.find_spec("onnxruntime") is not None:
        assert onnx and all("not finite" in m for m in onnx)
    row = pd.read_csv(out, keep_default_na=False).iloc[0]
    assert row["label"] == "error" and "non-finite" in row["error"]
    assert "FAILED" in capsys.readouterr().err


# ----------------------------------------------------------------------------- item 7: formats


def _saved(fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    _tissue(40, 40).save(buf, format=fmt, **kw)
    return buf.getvalue()


_EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 40 40\n%%EndComments\n"
        b"0 0 moveto 40 40 lineto stroke\nshowpage\n%%EOF\n")


def test_only_allowed_formats_are_decoded(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(a))
    assert set(ALLOWED_FORMATS) == {"PNG", "JPEG", "TIFF", "BMP", "WEBP"}
    for name, data in {"a.eps": _EPS, "a.gif": _saved("GIF"), "a.ppm": _saved("PPM"),
                       "a.tga": _saved("TGA"), "a.ico": _saved("ICO")}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageFormatError) as info:
            open_rgb(tmp_path / name)
        message = str(info.value)
        assert name in message and "PNG, JPEG, TIFF, BMP or WebP" in message, message
        assert isinstance(info.value, ImageError)  # callers that catch ImageError still do
    assert ran == []  # Ghostscript never ran
    for fmt in ("PNG", "JPEG", "TIFF", "BMP", "WEBP"):
        assert open_rgb(io.BytesIO(_saved(fmt))).size == (40, 40), fmt
    # A damaged file of an allowed format is a damaged image, not a format refusal.
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(_saved("PNG")[:16] + b"\x00" * 64)
    with pytest.raises(ImageError) as info:
        open_rgb(corrupt)
    assert not isinstance(info.value, ImageFormatError)


@pytest.mark.parametrize("decoder", ["imagecodecs", "torchvision"])
def test_rgb_pngs_decode_faster_to_the_same_pixels_and_damaged_ones_still_fail(
        decoder, tmp_path, monkeypatch):
    import breast_cancer_detection.data.datasets as datasets

    if decoder == "imagecodecs":
        pytest.importorskip("imagecodecs")
    else:  # as where imagecodecs is not installed
        import builtins

        real_import = builtins.__import__

        def no_imagecodecs(name, *args, **kwargs):
            if name == "imagecodecs":
                raise ImportError(name)
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_imagecodecs)
    used = []
    name, decode = datasets._png_decoder.__wrapped__()  # not the one cached
    assert name == decoder
    monkeypatch.setattr(datasets, "_png_decoder",
                        lambda: (name, lambda data: used.append(1) or decode(data)))
    rgb = np.random.default_rng(0).integers(0, 256, (46, 70, 3), dtype=np.uint8)
    path = tmp_path / "tissue.png"
    Image.fromarray(rgb).save(path)
    image = open_rgb(path)
    assert used == [1] and image.mode == "RGB" and np.array_equal(np.asarray(image), rgb)
    # Uploads (file objects), alpha and palette PNGs are Pillow's.
    assert np.array_equal(np.asarray(open_rgb(io.BytesIO(path.read_bytes()))), rgb)
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(np.dstack([rgb, np.full((46, 70), 255, np.uint8)])).save(tmp_path / "a.png")
    from PIL.PngImagePlugin import PngInfo

    bulky = PngInfo()
    bulky.add_text("note", "x" * (2 << 20))  # 2 MB of text: more than the pixels
    Image.fromarray(rgb).save(tmp_path / "bulky.png", pnginfo=bulky)
    for other in ("palette.png", "a.png", "bulky.png"):
        assert open_rgb(tmp_path / other).size == (70, 46)
    assert used == [1]
    # The pixel limit is checked from the header first, and a truncated file gets Pillow's
    # error, naming the file.
    with pytest.raises(ImageError, match="over the limit"):
        open_rgb(path, max_pixels=100)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ImageError, match="truncated.png"):
        open_rgb(truncated)
    assert used == [1, 1]  # the fast decoder refused it first


def test_a_progressive_jpeg_of_too_many_scans_is_refused_before_decoding(tmp_path,
                                                                          monkeypatch):
    from PIL import ImageFile

    from breast_cancer_detection.data.datasets import MAX_JPEG_SCANS

    bomb = jpeg_scan_bomb(1000, 2000)  # 2,010 passes over a megapixel: 24 KB
    assert len(bomb) < 40_000
    path = tmp_path / "scans.jpg"
    path.write_bytes(bomb)
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda im: decoded.append(im.size) or real_load(im))
    upload = io.BytesIO(bomb)
    upload.name = "upload.jpg"
    for source, name in ((path, str(path)), (upload, "upload.jpg")):  # `bcd predict`, uploads
        start = time.perf_counter()
        with pytest.raises(ImageError) as info:
            open_rgb(source)
        assert time.perf_counter() - start < 10.0  # a backstop: `decoded` below decides
        message = str(info.value)
        assert message.startswith(f"{name}: ") and f"more than {MAX_JPEG_SCANS} scans" in message
        assert "baseline" in message and "PNG" in message, message
    # Pillow opens a JPEG with a multi-picture header as MPO, and decodes its first frame:
    # that frame's last scan, repeated, is counted too.
    frames = io.BytesIO()
    Image.new("RGB", (64, 64)).save(frames, format="MPO", save_all=True, progressive=True,
                                    append_images=[Image.new("RGB", (8, 8))])
    two = frames.getvalue()
    end = two.index(b"\xff\xd9")  # the first frame's EOI
    last_scan = two[two.rindex(b"\xff\xda", 0, end):end]
    mpo_bomb = two[:end] + last_scan * 1000 + two[end:]
    assert Image.open(io.BytesIO(mpo_bomb)).format == "MPO"
    with pytest.raises(ImageError, match="scans"):
        open_rgb(io.BytesIO(mpo_bomb))
    assert decoded == []  # refused before the decoder ran
    # An ordinary progressive JPEG, and one with a few scans more, still decode.
    for copies in (0, 100):
        assert open_rgb(io.BytesIO(jpeg_scan_bomb(64, copies))).size == (64, 64)


def test_jpegs_are_turned_upright_as_their_exif_orientation_says(tmp_path):
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = (255, 0, 0)  # the left half red: upright, it ends on top (Orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show"
    path = tmp_path / "phone.jpg"
    Image.fromarray(rgb).save(path, exif=exif, quality=95)
    for source in (path, io.BytesIO(path.read_bytes())):
        image = open_rgb(source)
        assert image.size == (20, 40)  # width and height swapped
        arr = np.asarray(image).astype(int)
        assert arr[:15, :, 0].mean() > 200 and arr[25:, :, 0].mean() < 60
    # The limit and the reduced-decoding callback judge the upright size.
    with pytest.raises(ImageError, match="20x40 pixels"):
        open_rgb(path, max_pixels=100)
    seen = []
    assert open_rgb(path, reduced=lambda w, h: seen.append((w, h))).size == (20, 40)
    assert seen == [(20, 40)]
    big = tmp_path / "big.jpg"
    Image.new("RGB", (400, 200), (200, 100, 150)).save(big, exif=exif)
    assert open_rgb(big, reduced=lambda w, h: 50).size == (50, 100)  # 1/4, then upright
    # Without the tag, or from an image already decoded, nothing turns.
    plain = tmp_path / "plain.jpg"
    Image.fromarray(rgb).save(plain)
    assert open_rgb(plain).size == (40, 20)
    with Image.open(path) as im:
        assert open_rgb(im).size == (40, 20)


def test_predict_gives_a_format_refusal_as_an_error_row(predictor, tmp_path):
    gif = tmp_path / "a.gif"
    gif.write_bytes(_saved("GIF"))
    out = predictor.predict([gif, io.BytesIO(_saved("WEBP"))])
    assert out[0].label == "error" and "PNG, JPEG, TIFF, BMP or WebP" in out[0].error
    assert out[1].error is None


# ----------------------------------------------------------------------------- item 13: CAM


class _RednessModel(nn.Module):
    """Class 1's logit is the mean red-ness (R - B) of the input; class 0's its negative.

    Grad-CAM for class 1 is then the red-ness map itself, so the map of an image that is red
    on the left and blue on the right is known everywhere.
    """

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [-1.0, 0.0, 1.0]])[..., None, None])
        self.features = nn.Sequential(conv, nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).mean(dim=(2, 3))
        score = f[:, 0] - f[:, 1]
        return torch.stack([-score, score], dim=1)


def test_grad_cam_of_a_tiled_image_is_stitched_from_its_tiles():
    pre = Preprocessing(size=32, resize=40, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    pred = Predictor(_RednessModel(), pre, device="cpu", channels_last=False)
    arr = np.zeros((120, 200, 3), np.uint8)
    arr[:, :100] = (230, 50, 20)   # red left half
    arr[:, 100:] = (20, 50, 230)   # blue right half
    assert pred.predict(arr)[0].tiles == 5 * 9  # short side 120 > 2 tiles of 40: tiled
    view, cam = explain(pred, arr, target=1)
    # The map is in the frame of the whole image, not of a 32 px centre crop.
    assert view.size == (200, 120) and cam.shape == (120, 200)
    np.testing.assert_array_equal(np.asarray(view), arr)
    # Each tile's model input is its central 32 of 40 px: all but a 4 px border was seen.
    inner = cam[4:-4, 4:-4]
    assert inner[:, :92].min() > 0.95           # red tiles: the evidence for class 1
    assert inner[:, 100:].max() < 0.05          # blue tiles: none
    assert np.isnan(cam[:, :4]).all()  # the strip no tile input covered: no value at all
    other = explain(pred, arr, target=0)[1]     # class 0's evidence is the blue half
    assert other[4:-4, 108:-4].min() > 0.95 and other[4:-4, 4:92].max() < 0.05


@pytest.mark.slow
def test_grad_cam_of_a_huge_tiled_image_is_drawn_at_a_bounded_size():
    pre = Preprocessing(size=32, resize=40, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    pred = Predictor(_RednessModel(), pre, device="cpu", channels_last=False)
    arr = np.zeros((300, 3000, 3), np.uint8)
    arr[:, :1500] = (230, 50, 20)
    view, cam = explain(pred, arr, target=1)
    assert view.size == (1024, 102) and cam.shape == (102, 1024)
    assert cam[5:-5, 20:500].min() > 0.9 and cam[5:-5, 530:-20].max() < 0.05


def test_untiled_images_are_explained_in_their_own_frame(predictor):
    image = _tissue(46, 70)
    view, cam = explain(predictor, image)
    assert view.size == (70, 46) and cam.shape == (46, 70)
    view, cam = explain(predictor, image, frame="model")
    assert view.size == (32, 32) and cam.shape == (32, 32)
    with pytest.raises(ImageError, match="16 px"):
        explain(predictor, _tissue(4, 4))


def test_cli_cam_of_a_tiled_image_covers_the_image(trained, tmp_path):
    image = tmp_path / "large.png"
    _tissue(100, 120).save(image)
    folder = tmp_path / "cams"
    assert main(["predict", str(trained), str(image), "--out", str(tmp_path / "p.csv"),
                 "--cam", str(folder), "--quiet"]) == 0
    # The image beside its map: 8 inches wide, its height from the image's 100:120 aspect
    # (4 inches of panel at that aspect, 1 inch of titles and legend), at 120 dpi.
    assert Image.open(folder / "large-cam.png").size == (960, round((4 * 100 / 120 + 1) * 120))


def test_predict_table_gives_non_finite_outputs_an_error(tmp_path):
    from breast_cancer_detection.data.breakhis import build_index

    for cls in ("benign", "malignant"):
        (tmp_path / cls).mkdir()
        _tissue(46, 70).save(tmp_path / cls / "a.png")
    pred = Predictor(_NanModel(), Preprocessing(size=32, resize=40), device="cpu")
    out = pred.predict_table(tmp_path, build_index(tmp_path), progress=False)
    assert (out["prediction"] == -1).all()
    assert out["error"].str.contains("non-finite").all()


def test_float_images_are_converted_without_float64_copies():
    import tracemalloc

    from breast_cancer_detection.data.datasets import _to_rgb

    values = np.random.default_rng(0).random((1000, 1200), dtype=np.float32) * 300
    im = Image.fromarray(values)  # mode F, as a 32-bit float TIFF opens
    tracemalloc.start()
    out = _to_rgb(im)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.mode == "RGB" and out.size == (1200, 1000)
    assert peak / values.size < 12  # bytes a pixel: a float32 copy, uint8, RGB (float64: ~23)
    # Values above 255 mean a 16-bit range: scaled by 65535, as before.
    assert np.asarray(out)[0, 0, 0] == int(np.clip(values[0, 0] / 65535 * 255, 0, 255))

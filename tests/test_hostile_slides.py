"""Whole slides under hostile input, forged with tifffile (small files: a header can claim a
trillion pixels with a handful of tiles): each ends in bounded time with a row that says what
happened, the other slides of the run are scored, nothing is written outside --out, and
/api/slides answers while any one slide's files are bad."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from breast_cancer_detection.cli import main
from breast_cancer_detection.slides.make import demo_slide
from breast_cancer_detection.slides.run import analyse_slides, read_slides_csv

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("openslide")

MPP = 0.243  # a 40x scan: the PCam model's 0.972 um/px tiles are read at a 4x downsample


@pytest.fixture(scope="module")
def model():
    from breast_cancer_detection.inference import Predictor

    return Predictor.from_pretrained("pcam-patch-cnn", device="cpu")


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A small real slide: the demo slide of 6 x 8 cells."""
    path = tmp_path_factory.mktemp("good") / "good.tif"
    demo_slide(path, grid=(6, 8), patches=None)
    return path


def _claiming(path: Path, height: int, width: int, *, tile: int = 2048) -> Path:
    """A one-level tiled TIFF whose header claims ``height x width`` px, of which only the
    first 4 tiles hold pixels (the rest are empty)."""
    block = np.full((tile, tile, 3), (200, 120, 180), np.uint8)
    n = -(-height // tile) * -(-width // tile)

    def tiles():
        for i in range(n):
            yield block if i < 4 else None

    per_cm = 1e4 / MPP
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile),
                 photometric="rgb", compression="zlib", resolution=(per_cm, per_cm),
                 resolutionunit="CENTIMETER", metadata=None)
    return path


def _run(model, slides: list[Path], out: Path, **kw) -> pd.DataFrame:
    start = time.perf_counter()
    table = analyse_slides(model, slides, out, workers=0, progress=False, **kw)
    table.attrs["seconds"] = time.perf_counter() - start
    return table


def _tissue(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.array([200, 120, 180]) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(
        np.uint8)


# ----------------------------------------------------------------------------- cost bounds


def test_a_header_claiming_a_trillion_pixels_is_refused_before_any_pixel_is_read(
        model, good, tmp_path):
    huge = _claiming(tmp_path / "huge.tif", 1_000_000, 1_000_000, tile=4096)
    assert huge.stat().st_size < 5_000_000
    table = _run(model, [huge, good], tmp_path / "out")
    assert table.attrs["seconds"] < 60
    bad, ok = table.itertuples()
    assert "1,000,000 x 1,000,000 px" in bad.error and "--max-slide-gigapixels" in bad.error
    assert ok.error == "" and ok.tiles > 0  # the next slide is scored


def test_a_slide_without_a_pyramid_level_near_its_thumbnail_is_refused(model, tmp_path):
    flat = _claiming(tmp_path / "flat.tif", 120_000, 120_000)
    table = _run(model, [flat], tmp_path / "out")
    assert table.attrs["seconds"] < 30
    assert "no pyramid level near the thumbnail's scale" in table["error"].iloc[0]
    assert "vips tiffsave" in table["error"].iloc[0]


def test_a_slide_past_its_deadline_gets_an_error_row(model, good, tmp_path):
    table = _run(model, [good], tmp_path / "out", timeout=1e-6)
    assert "not done within --slide-timeout" in table["error"].iloc[0]
    assert not (tmp_path / "out" / "good" / "tiles.csv").exists()


def test_a_jpeg_tile_holding_a_frame_larger_than_its_tile_is_refused_undecoded(
        model, good, tmp_path):
    pytest.importorskip("imagecodecs")
    tile = 256
    small = io.BytesIO()
    Image.fromarray(_tissue(tile, tile)).save(small, format="JPEG")
    big = io.BytesIO()
    Image.new("RGB", (8000, 8000), (200, 120, 180)).save(big, format="JPEG")  # 192 MP
    shape = (4 * tile, 4 * tile, 3)

    def tiles():
        yield big.getvalue()
        for _ in range(15):
            yield small.getvalue()

    path = tmp_path / "bomb.tif"
    per_cm = 1e4 / MPP
    with tifffile.TiffWriter(path) as tw:
        tw.write(tiles(), shape=shape, dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                 compression="jpeg", resolution=(per_cm, per_cm), resolutionunit="CENTIMETER",
                 metadata=None)
    table = _run(model, [path, good], tmp_path / "out")
    bad, ok = table.itertuples()
    assert "8,000 x 8,000 px JPEG frame, larger than its 256 x 256 tile" in bad.error
    assert ok.error == ""


def test_an_infinite_or_zero_option_ends_in_a_message_not_a_traceback(good, tmp_path, capsys):
    for flag, value in (("--mpp", "inf"), ("--model-mpp", "nan"), ("--slide-timeout", "inf"),
                        ("--max-slide-gigapixels", "0")):
        assert main(["slide", str(good), "--out", str(tmp_path / "o"), flag, value]) == 2
        assert flag in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- no silent answers


def test_a_scoring_level_without_data_is_an_error_not_a_score(model, tmp_path):
    """Level 1 (what the tiles are read from) is blank white, while levels 0, 2 and 3 (the
    thumbnail's) hold tissue: before, the tiles read as glass and got a plain low score."""
    image = _tissue(2048, 2048)
    levels = [image, np.full((1024, 1024, 3), 255, np.uint8)]
    levels += [np.asarray(Image.fromarray(image).resize((s, s))) for s in (512, 256)]
    path = tmp_path / "hollow.tif"
    with tifffile.TiffWriter(path) as tw:
        for k, level in enumerate(levels):
            per_cm = 1e4 / (0.486 * 2 ** k)
            tw.write(level, tile=(256, 256), photometric="rgb", compression="zlib",
                     subfiletype=1 if k else 0, resolution=(per_cm, per_cm),
                     resolutionunit="CENTIMETER", metadata=None)
    table = _run(model, [path], tmp_path / "out", thumb_side=256)
    error = table["error"].iloc[0]
    assert "read as blank (white or black) from level 1" in error, table.to_dict("records")
    assert np.isnan(table["score"].iloc[0])


# ----------------------------------------------------------------------------- outputs


def test_slide_names_never_leave_out_nor_take_the_runs_own_files(model, good, tmp_path):
    names = ["...tif", "..tif", "slides.csv.tif", "a b?.tif"]
    src = tmp_path / "in"
    src.mkdir()
    slides = []
    for name in names:
        shutil.copy(good, src / name)
        slides.append(src / name)
    (tmp_path / "keep.txt").write_text("mine")
    out = tmp_path / "run" / "out"
    table = _run(model, slides, out)
    assert (table["error"] == "").all(), table["error"].tolist()
    assert (out / "slides.csv").is_file() and (tmp_path / "keep.txt").read_text() == "mine"
    folders = table["folder"].tolist()
    assert folders == ["slide-..", "slide-.", "slide-slides.csv", "a_b_"]
    for folder in folders:
        assert (out / folder / "tiles.csv").is_file()
        assert (out / folder).resolve().parent == out.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "keep.txt", "run"]
    assert read_slides_csv(out / "slides.csv")["slide"].tolist() == [str(s) for s in slides]


def test_an_error_row_takes_the_slides_old_outputs_with_it(model, good, tmp_path):
    need = pytest.importorskip("fastapi")
    del need
    from fastapi.testclient import TestClient

    from breast_cancer_detection.app import create_app

    slide = tmp_path / "s.tif"
    shutil.copy(good, slide)
    out = tmp_path / "out"
    assert _run(model, [slide], out)["error"].iloc[0] == ""
    assert (out / "s" / "heatmap.png").is_file()
    slide.write_bytes(b"II*\x00 damaged")  # replaced by a damaged file, then run again
    table = _run(model, [slide], out)
    assert table["error"].iloc[0]
    assert not any((out / "s").iterdir())  # no heat map, tiles or regions left to show
    client = TestClient(create_app(model, slides=out), base_url="http://127.0.0.1")
    (entry,) = client.get("/api/slides").json()["slides"]
    assert entry["files"] == {} and entry["error"]


def test_a_finished_slide_missing_an_output_is_redone_not_kept(model, good, tmp_path):
    out = tmp_path / "out"
    _run(model, [good], out)
    (out / "good" / "tiles.csv").unlink()
    table = _run(model, [good], out)
    assert table.attrs["reused"] == [] and (out / "good" / "tiles.csv").is_file()
    assert _run(model, [good], out).attrs["reused"] == [str(good)]  # complete: kept


def test_formula_leading_names_are_written_as_text_and_read_back(model, good, tmp_path,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(good, tmp_path / "=cmd.tif")
    out = tmp_path / "out"
    _run(model, [Path("=cmd.tif")], out)
    raw = (out / "slides.csv").read_text().splitlines()[1]
    assert raw.startswith("'=cmd.tif,")  # a spreadsheet shows it as text
    assert read_slides_csv(out / "slides.csv")["slide"].tolist() == ["=cmd.tif"]


# ----------------------------------------------------------------------------- /api/slides


@pytest.mark.parametrize("regions", ["strings", "deep", "large"])
def test_a_bad_regions_file_costs_its_row_a_note_not_the_listing(model, good, tmp_path,
                                                                 regions):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from breast_cancer_detection.app import create_app
    from breast_cancer_detection.app.server import REGIONS_MAX_BYTES

    out = tmp_path / "out"
    other = tmp_path / "other.tif"
    shutil.copy(good, other)
    _run(model, [good, other], out)
    path = out / "good" / "regions.geojson"
    if regions == "strings":
        path.write_text(json.dumps({"type": "FeatureCollection",
                                    "features": [{"properties": "x"}]}))
    elif regions == "deep":
        path.write_text('{"features": ' + "[" * 100_000 + "]" * 100_000 + "}")
    else:
        path.write_bytes(b" " * (REGIONS_MAX_BYTES + 1))
    client = TestClient(create_app(model, slides=out), base_url="http://127.0.0.1")
    start = time.perf_counter()
    r = client.get("/api/slides")
    assert r.status_code == 200 and time.perf_counter() - start < 10
    by_name = {s["name"]: s for s in r.json()["slides"]}
    assert by_name["good.tif"]["note"] and by_name["good.tif"]["regions"] is None
    assert by_name["other.tif"]["note"] is None and by_name["other.tif"]["regions"] is not None
    assert "heatmap.png" in by_name["good.tif"]["files"]  # the slide's other files still shown


def test_a_table_dated_in_the_future_is_still_cached(model, good, tmp_path):
    import os

    pytest.importorskip("fastapi")
    from breast_cancer_detection.app.slides import Slides as _Slides

    out = tmp_path / "out"
    _run(model, [good], out)
    future = time.time_ns() + 10**12  # 1,000 s ahead: a skewed clock
    os.utime(out / "slides.csv", ns=(future, future))
    os.utime(out, ns=(future, future))
    slides = _Slides(out)
    assert slides._stamp() is not None
    first = slides.listing()
    assert slides.listing() is first  # served from the cache, not rebuilt


def test_requests_arriving_together_after_the_table_changes_cost_one_build(model, good,
                                                                           tmp_path,
                                                                           monkeypatch):
    import threading

    pytest.importorskip("fastapi")
    from breast_cancer_detection.app import slides as slides_module

    out = tmp_path / "out"
    _run(model, [good], out)
    builds = []
    real = slides_module.Slides._listing_now

    def slow(self):
        builds.append(1)
        time.sleep(0.5)  # a long listing being built
        return real(self)

    monkeypatch.setattr(slides_module.Slides, "_listing_now", slow)
    monkeypatch.setattr(slides_module.Slides, "SETTLED_NS", 10**15)  # slides.csv "just written"
    slides = slides_module.Slides(out)
    first = threading.Thread(target=slides.listing)
    first.start()
    time.sleep(0.1)  # the first build is under way; eight more requests arrive
    answers = []
    others = [threading.Thread(target=lambda: answers.append(slides.listing()))
              for _ in range(8)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join()
    assert len(answers) == 8 and len(builds) == 2  # the first, then one for all eight


def test_the_cli_limits_are_the_libraries():
    from breast_cancer_detection.cli import build_parser
    from breast_cancer_detection.slides.limits import MAX_SLIDE_PIXELS
    from breast_cancer_detection.slides.run import DEFAULT_SLIDE_TIMEOUT

    args = build_parser().parse_args(["slide", "x.tif", "--out", "o"])
    assert args.slide_timeout == DEFAULT_SLIDE_TIMEOUT
    assert args.max_slide_gigapixels * 1e9 == MAX_SLIDE_PIXELS

"""`bcd slide`: reading, scale, tissue, grid, regions, shards, bad slides (synthetic slides);
and on real PatchCamelyon patches (real_data) that the bundled model finds the tumour."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from breast_cancer_detection.cli import main
from breast_cancer_detection.data.datasets import open_rgb
from breast_cancer_detection.errors import UserError
from breast_cancer_detection.slides import (
    SlideError,
    TileGrid,
    analyse_slide,
    analyse_slides,
    demo_slide,
    model_mpp,
    open_slide,
    otsu_threshold,
    parse_shard,
    slide_mpp,
    tissue_mask,
    write_slide,
)
from breast_cancer_detection.slides.reader import TileDataset, _Batches, thumbnail
from breast_cancer_detection.slides.regions import _polygons, region_features

from conftest import SHARED_DATA

openslide = pytest.importorskip("openslide")
pytest.importorskip("tifffile")

PCAM_VALID = SHARED_DATA / "pcam-subset" / "valid"


class FakeSlide:
    """What TileGrid and slide_mpp read of an OpenSlide object."""

    def __init__(self, dimensions, downsamples=(1.0, 4.0, 16.0), properties=None):
        self.dimensions = dimensions
        self.level_downsamples = downsamples
        self.properties = properties or {}

    def get_best_level_for_downsample(self, ds):
        return max(i for i, d in enumerate(self.level_downsamples) if d <= ds)


@pytest.fixture(scope="module")
def bundled():
    from breast_cancer_detection.inference import Predictor

    return Predictor.from_pretrained("pcam-patch-cnn", device="cpu", progress=False)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, tuple[Path, pd.DataFrame]]:
    root = tmp_path_factory.mktemp("slides")
    made = {}
    for name, kw in {"tumour": {"tumour": True}, "normal": {"tumour": False, "seed": 1}}.items():
        path = root / f"{name}.tif"
        made[name] = (path, demo_slide(path, grid=(8, 10), **kw))
    return made


# --- reading ----------------------------------------------------------------------------------


def test_written_slide_is_a_pyramid_openslide_reads_with_its_mpp(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (1100, 1500, 3), dtype=np.uint8)
    path = write_slide(tmp_path / "s.tif", image, mpp=0.25, min_side=200)
    slide = open_slide(path)
    assert slide.dimensions == (1500, 1100)
    assert slide.level_count == 3  # 1100 -> 550 -> 275 (the next would be under 200)
    assert [round(d) for d in slide.level_downsamples] == [1, 2, 4]
    assert slide_mpp(slide, path) == (pytest.approx(0.25), "slide metadata (mpp)")
    region = np.asarray(slide.read_region((100, 200), 0, (30, 20)).convert("RGB"))
    np.testing.assert_array_equal(region, image[200:220, 100:130])

    import tifffile

    with tifffile.TiffFile(path) as tif:
        assert [p.subfiletype for p in tif.pages] == [0, 1, 1]
        assert all(p.is_tiled for p in tif.pages)


def test_slide_without_mpp_is_refused_with_how_to_give_it(tmp_path):
    path = write_slide(tmp_path / "new" / "s.tif", np.full((600, 600, 3), 200, np.uint8), mpp=None)
    slide = open_slide(path)
    with pytest.raises(SlideError, match=r"s\.tif.*--mpp"):
        slide_mpp(slide, path)
    assert slide_mpp(slide, path, override=0.5) == (0.5, "--mpp")
    with pytest.raises(SlideError, match="positive"):
        slide_mpp(slide, path, override=0)


def test_objective_power_gives_the_scale_when_mpp_is_missing():
    mpp, source = slide_mpp(FakeSlide((10, 10), properties={"openslide.objective-power": "20"}))
    assert mpp == pytest.approx(0.5) and "objective power 20x" in source
    mpp, _ = slide_mpp(FakeSlide((10, 10), properties={"openslide.mpp-x": "0.2",
                                                       "openslide.mpp-y": "0.3"}))
    assert mpp == pytest.approx(0.25)


@pytest.mark.parametrize("content, match", [
    (b"not a slide at all", "not a whole-slide image"),
    (None, "no such file"),
])
def test_not_a_slide_is_a_clear_error(tmp_path, content, match):
    path = tmp_path / "x.svs"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SlideError, match=match):
        open_slide(path)


def test_thumbnail_is_bounded_and_matches_the_image(tmp_path):
    image = np.zeros((800, 1200, 3), np.uint8)
    image[:, 600:] = (200, 100, 150)
    slide = open_slide(write_slide(tmp_path / "s.tif", image, mpp=0.5, min_side=100))
    thumb, ds = thumbnail(slide, 300)
    assert thumb.shape == (200, 300, 3) and ds == pytest.approx(4)
    assert (thumb[:, :140] == 0).all() and (np.abs(thumb[:, 160:].astype(int)
                                                   - (200, 100, 150)) <= 1).all()


def test_thumbnail_from_the_tiffs_tiles_is_openslides(tmp_path, monkeypatch):
    from breast_cancer_detection.slides import reader as reader_module

    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (1100, 1500, 3), dtype=np.uint8)
    path = write_slide(tmp_path / "s.tif", image, mpp=0.5, min_side=100)
    slide = open_slide(path)
    monkeypatch.setattr(reader_module, "_STRIP_PIXELS", 100_000)  # several strips
    used = []
    real = reader_module.TiffLevel.read

    def read(self, *a):
        used.append(a)
        return real(self, *a)

    monkeypatch.setattr(reader_module.TiffLevel, "read", read)
    direct, ds = thumbnail(slide, 400, path)
    assert len(used) > 2 and ds == pytest.approx(3.75)
    monkeypatch.setattr(reader_module.TiffLevel, "for_level", lambda *a: None)
    by_openslide, _ = thumbnail(slide, 400, path)
    np.testing.assert_array_equal(direct, by_openslide)


# --- tissue and grid ------------------------------------------------------------------------


def test_otsu_splits_two_modes():
    values = np.r_[np.full(500, 20), np.full(500, 200)].astype(np.uint8)
    assert 20 <= otsu_threshold(values) < 200


def test_tissue_mask_finds_stain_drops_specks_and_fills_holes():
    img = np.full((200, 300, 3), 240, np.uint8)       # glass
    img[40:160, 50:250] = (200, 110, 170)            # tissue
    img[90:95, 140:145] = 240                          # a small hole in it
    img[10:12, 10:12] = (120, 40, 120)                 # a speck on the glass
    mask, cut = tissue_mask(img, min_area=50)
    assert mask[40:160, 50:250][3:-3, 3:-3].all()    # hole filled, inside kept
    assert not mask[:30].any() and not mask[:, :40].any()  # glass and speck
    assert 0.07 <= cut <= 0.15
    strict, cut = tissue_mask(img, threshold=0.9)
    assert cut == 0.9 and not strict.any()


def test_grid_reads_from_the_coarsest_level_that_has_the_resolution():
    # 0.25 um/px slide, model at 0.972: 3.888x; level 1 (4x) is too coarse, level 0 serves.
    # The tile is read as 373 level pixels, and the grid steps by 373 too (not 373.248):
    # tiles neither overlap nor leave gaps, and each starts on a whole level pixel.
    g = TileGrid.for_slide(FakeSlide((10000, 8000)), size=96, slide_mpp=0.25, model_mpp=0.972)
    assert (g.level, g.read_size, g.tile0, g.cols) == (0, 373, 373.0, 26)
    assert (g.origins(np.array([1]), np.array([2])) == [[746, 373]]).all()
    # An Aperio-like level of downsample 2.0004: no whole level pixels to step by, so the
    # grid keeps the model's field of view in level-0 pixels.
    g = TileGrid.for_slide(FakeSlide((10000, 8000), (1.0, 2.0004)), size=96, slide_mpp=0.25,
                           model_mpp=0.972)
    assert (g.level, g.read_size) == (1, 187) and g.tile0 == pytest.approx(373.248)
    # 0.243 um/px: exactly 4x, so level 1 serves; 384 px tiles, 10000 // 384 and 8000 // 384.
    g = TileGrid.for_slide(FakeSlide((10000, 8000)), size=96, slide_mpp=0.243, model_mpp=0.972)
    assert (g.level, g.read_size, g.cols, g.rows) == (1, 96, 26, 20)
    with pytest.raises(ValueError, match="smaller than one tile"):
        TileGrid.for_slide(FakeSlide((300, 300)), size=96, slide_mpp=0.25, model_mpp=0.972)
    with pytest.raises(ValueError, match=r"coarser than the model's.*enlarged 2\.1x"):
        TileGrid.for_slide(FakeSlide((9000, 9000)), size=96, slide_mpp=2.0, model_mpp=0.972)


def test_tissue_fraction_equals_counting_pixels():
    rng = np.random.default_rng(1)
    mask = rng.random((97, 131)) > 0.6
    g = TileGrid(tile0=30.0, level=0, level_downsample=1.0, read_size=30, size=30,
                 cols=9, rows=6)
    frac = g.tissue_fraction(mask, mask_downsample=2.0)  # a tile covers 15 mask pixels
    for r in range(g.rows):
        for c in range(g.cols):
            assert frac[r, c] == pytest.approx(mask[r * 15:(r + 1) * 15,
                                                    c * 15:(c + 1) * 15].mean())


# --- regions ------------------------------------------------------------------------------


def _ints(polys):
    return [[[tuple(int(v) for v in p) for p in ring] for ring in poly] for poly in polys]


def test_region_outline_keeps_its_hole_and_splits_diagonal_neighbours():
    ring = np.zeros((5, 5), bool)
    ring[1:4, 1:4] = True
    ring[2, 2] = False
    (poly,) = _ints(_polygons(ring))
    assert poly[0] == [(1, 1), (4, 1), (4, 4), (1, 4), (1, 1)]
    assert sorted(poly[1][:-1]) == [(2, 2), (2, 3), (3, 2), (3, 3)]
    # A hole touching the outline at a corner stays a hole of its own.
    notch = np.ones((3, 3), bool)
    notch[0, 0] = notch[1, 1] = False
    (poly,) = _ints(_polygons(notch))
    assert len(poly) == 2 and len(poly[1]) == 5

    prob = np.full((4, 6), np.nan)
    prob[0, 0] = prob[1, 1] = 0.9   # diagonal: two regions
    prob[2:4, 3:6] = 0.8            # one 2x3 region
    prob[3, 0] = 0.2                # under the threshold
    feats = region_features(prob, 0.5, 100.0, tile_area_mm2=0.01)
    assert [f["properties"]["tiles"] for f in feats] == [6, 1, 1]
    big = feats[0]
    assert big["geometry"] == {"type": "Polygon", "coordinates": [
        [[300, 200], [600, 200], [600, 400], [300, 400], [300, 200]]]}
    assert big["properties"]["area_mm2"] == pytest.approx(0.06)
    assert big["properties"]["classification"]["name"] == "Tumor"


# --- shards ---------------------------------------------------------------------------------


def test_parse_shard(monkeypatch):
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(UserError, match="--shard"):
            parse_shard(bad)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parse_shard(None) is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert parse_shard(None) == (2, 4)


# --- the model's scale ----------------------------------------------------------------------


def test_model_scale_comes_from_override_checkpoint_registry_or_magnification(bundled, predictor):
    assert model_mpp(bundled) == (0.972, "checkpoint")  # trained with the pcam-cpu preset
    assert model_mpp(bundled, 0.5) == (0.5, "--model-mpp")
    stored = bundled.checkpoint.mpp
    try:  # a checkpoint that does not carry its scale: the registry entry's
        bundled.checkpoint.mpp = None
        assert model_mpp(bundled) == (0.972, "trained model pcam-patch-cnn")
    finally:
        bundled.checkpoint.mpp = stored
    with pytest.raises(UserError, match="--model-mpp"):
        model_mpp(predictor)  # the tiny BreakHis run trained on all magnifications
    ckpt = predictor.checkpoint
    try:
        ckpt.magnification = ["40X"]
        assert model_mpp(predictor) == (0.49, "BreakHis 40X (approximate)")
        ckpt.mpp = 0.3
        assert model_mpp(predictor) == (0.3, "checkpoint")
    finally:
        ckpt.magnification, ckpt.mpp = None, None


# --- whole runs -----------------------------------------------------------------------------


def _on_cells(tiles: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    return tiles.merge(cells, on=["x", "y"], how="left")


@pytest.mark.slow
def test_slide_outputs_tiles_on_tissue_only_read_from_level_1(bundled, slides, tmp_path):
    path, cells = slides["tumour"]
    r = analyse_slide(bundled, path, tmp_path / "tumour", workers=0, progress=False)
    assert r.error == "", r.error
    assert r.level == 1  # 0.486 um/px at level 0: level 1 has the model's 0.972 um/px
    for name in ("tiles.csv", "heatmap.png", "tissue.png", "regions.geojson", "top_tiles.png",
                 "slide.json"):
        assert (tmp_path / "tumour" / name).stat().st_size > 0, name
    tiles = pd.read_csv(tmp_path / "tumour" / "tiles.csv")
    assert list(tiles.columns) == ["x", "y", "width", "height", "p_malignant"]
    assert (tiles[["width", "height"]] == 192).all().all()
    joined = _on_cells(tiles, cells)
    assert joined["label"].notna().all() and (joined["label"] >= 0).all()  # never on glass
    tissue_cells = int((cells["label"] >= 0).sum())
    assert len(tiles) >= 0.8 * tissue_cells
    assert r.tiles == len(tiles) and tiles["p_malignant"].between(0, 1).all()
    assert r.score == pytest.approx(np.sort(tiles["p_malignant"])[::-1][:10].mean(), abs=1e-5)
    geo = json.loads((tmp_path / "tumour" / "regions.geojson").read_text())
    assert geo["type"] == "FeatureCollection"
    assert sum(f["properties"]["tiles"] for f in geo["features"]) == r.tumour_tiles


@pytest.mark.slow
def test_tiles_match_reading_each_tile_by_hand(bundled, slides, tmp_path):
    """The batched DataLoader path gives the same numbers as one tile at a time."""
    path, _ = slides["tumour"]
    r = analyse_slide(bundled, path, tmp_path / "t", workers=2, batch_size=7, progress=False)
    tiles = pd.read_csv(tmp_path / "t" / "tiles.csv").head(5)
    slide = open_slide(path)
    for row in tiles.itertuples():
        img = slide.read_region((row.x, row.y), 1, (96, 96)).convert("RGB")
        p = bundled.predict(img)[0].p_malignant
        assert p == pytest.approx(row.p_malignant, abs=1e-4)
    assert r.error == ""


def test_dataset_opens_the_slide_once_per_process(slides):
    path, _ = slides["normal"]
    ds = TileDataset(path, np.array([[0, 0], [192, 192]]), 1, 96, 96)
    x, i = ds[1]
    assert x.shape == (3, 96, 96) and x.dtype == torch.uint8 and i == 1
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), np.asarray(ds.read(1)))
    first = ds._slide
    ds[0]
    assert ds._slide is first
    import pickle

    assert pickle.loads(pickle.dumps(ds))._slide is None


@pytest.mark.slow
def test_bad_slides_get_an_error_row_and_the_others_carry_on(bundled, slides, tmp_path):
    good, _ = slides["normal"]
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    not_slide = tmp_path / "notes.svs"
    not_slide.write_text("hello")
    no_mpp = tmp_path / "nompp.tif"
    write_slide(no_mpp, np.full((600, 600, 3), 200, np.uint8), mpp=None)
    out = tmp_path / "out"
    table = analyse_slides(bundled, [truncated, not_slide, good, no_mpp], out, workers=0,
                           progress=False)
    errors = dict(zip(table["folder"], table["error"]))
    assert errors["normal"] == ""
    assert errors["notes"].startswith(f"{not_slide}: not a whole-slide image")
    assert "--mpp" in errors["nompp"]
    assert errors["truncated"]  # fails to open or to read its tiles: says so, no traceback
    written = pd.read_csv(out / "slides.csv", keep_default_na=False)
    assert list(written["folder"]) == ["truncated", "notes", "normal", "nompp"]
    assert not (out / "notes").exists()


@pytest.mark.slow
def test_cli_exit_codes_and_summary(slides, tmp_path, capsys):
    path, _ = slides["normal"]
    assert main(["slide", str(path), "--out", str(tmp_path / "o"), "--workers", "0",
                 "--quiet"]) == 0
    out = capsys.readouterr()
    assert "Using the default trained model for whole slides, pcam-patch-cnn" in out.err
    assert "normal.tif: score" in out.out and "1 slide, 0 failed" in out.out
    assert "kept; --force redoes it" not in out.out
    assert main(["slide", str(path), "--out", str(tmp_path / "o"), "--workers", "0",
                 "--quiet"]) == 0  # the same again: said to be kept, not silently reprinted
    assert "normal.tif: score" in (out := capsys.readouterr().out)
    assert "done before with the same model and settings: kept; --force redoes it" in out
    bad = tmp_path / "bad.svs"
    bad.write_text("x")
    assert main(["slide", str(path), str(bad), "--out", str(tmp_path / "o"), "--workers", "0",
                 "--quiet"]) == 1
    assert "FAILED" in capsys.readouterr().err
    for bad in (["--min-tissue", "0"], ["--top-k", "0"], ["--tissue-threshold", "1.5"]):
        assert main(["slide", str(path), "--out", str(tmp_path / "o"), *bad]) == 2
        assert bad[0] in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["slide", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no slide files" in capsys.readouterr().err


@pytest.mark.slow
def test_done_slides_are_skipped_and_force_redoes_them(bundled, slides, tmp_path,
                                                         monkeypatch):
    path, _ = slides["normal"]
    first = analyse_slide(bundled, path, tmp_path / "n", workers=0, progress=False)
    stamp = (tmp_path / "n" / "tiles.csv").stat().st_mtime_ns
    again = analyse_slide(bundled, path, tmp_path / "n", workers=0, progress=False)
    assert again.score == first.score and again.tiles == first.tiles
    assert again.reused and not first.reused
    assert (tmp_path / "n" / "tiles.csv").stat().st_mtime_ns == stamp
    changed = analyse_slide(bundled, path, tmp_path / "n", workers=0, progress=False,
                            min_tissue=0.9)
    assert (tmp_path / "n" / "tiles.csv").stat().st_mtime_ns != stamp
    assert changed.tiles <= first.tiles
    stamp = (tmp_path / "n" / "tiles.csv").stat().st_mtime_ns
    forced = analyse_slide(bundled, path, tmp_path / "n", workers=0, progress=False,
                           min_tissue=0.9, force=True)
    assert forced.tiles == changed.tiles and not forced.reused
    assert (tmp_path / "n" / "tiles.csv").stat().st_mtime_ns != stamp
    # Outputs made by a version that cut tiles another way are redone, not reused.
    import breast_cancer_detection.slides.run as run_module

    monkeypatch.setattr(run_module, "GRID_VERSION", run_module.GRID_VERSION + 1)
    redone = analyse_slide(bundled, path, tmp_path / "n", workers=0, progress=False,
                           min_tissue=0.9)
    assert not redone.reused


@pytest.mark.slow
def test_shards_split_the_slides_and_the_last_merges(bundled, slides, tmp_path):
    paths = [slides["tumour"][0], slides["normal"][0], slides["tumour"][0]]
    out = tmp_path / "out"
    a = analyse_slides(bundled, paths, out, shard=(0, 2), workers=0, progress=False)
    assert list(a["folder"]) == ["tumour", "tumour-2"]
    assert not (out / "slides.csv").exists()  # shard 1 has not finished
    b = analyse_slides(bundled, paths, out, shard=(1, 2), workers=0, progress=False)
    assert list(b["folder"]) == ["normal"]
    merged = pd.read_csv(out / "slides.csv", keep_default_na=False)
    assert list(merged["folder"]) == ["tumour", "normal", "tumour-2"]
    assert merged.loc[0, "score"] == pytest.approx(merged.loc[2, "score"])


# --- real tissue ----------------------------------------------------------------------------


@pytest.mark.real_data("pcam-subset/valid")
@pytest.mark.slow
@pytest.mark.parametrize("backend, workers", [("torch", 2), ("auto", 0)])
def test_bundled_model_finds_the_tumour_disc_in_real_patches(bundled, tmp_path, backend,
                                                             workers):
    # auto, no workers: what `bcd slide` runs on a CPU by default (the int8 model, two lanes,
    # strips cut from the TIFF's tiles).
    from sklearn.metrics import roc_auc_score

    if backend == "auto":
        pytest.importorskip("onnxruntime")
    predictor = bundled.on_backend(backend, cache_dir=tmp_path / "cache")
    tumour = tmp_path / "tumour.tif"
    cells = demo_slide(tumour, grid=(16, 20), patches=PCAM_VALID, seed=0)
    normal = tmp_path / "normal.tif"
    demo_slide(normal, grid=(16, 20), patches=PCAM_VALID, tumour=False, seed=1)
    table = analyse_slides(predictor, [tumour, normal], tmp_path / "out", workers=workers,
                           progress=False)
    assert (table["error"] == "").all(), table["error"].tolist()
    tiles = _on_cells(pd.read_csv(tmp_path / "out" / "tumour" / "tiles.csv"), cells)
    assert (tiles["label"] >= 0).all()  # no tile read off tissue
    assert tiles["label"].sum() >= 10
    assert roc_auc_score(tiles["label"], tiles["p_malignant"]) >= 0.9
    score = dict(zip(table["folder"], table["score"]))
    assert score["tumour"] > score["normal"]


@pytest.mark.slow
def test_onnx_backend_gives_the_torch_numbers_and_carries_the_scale(bundled, slides, tmp_path):
    pytest.importorskip("onnxruntime")
    from breast_cancer_detection.checkpoint import load_checkpoint, save_checkpoint
    from breast_cancer_detection.export import export_onnx
    from breast_cancer_detection.inference import Predictor
    from breast_cancer_detection.pretrained import resolve_trained

    ckpt = load_checkpoint(resolve_trained("pcam-patch-cnn"))
    ckpt.mpp = 0.972
    save_checkpoint(ckpt, tmp_path / "m.pt")
    export_onnx(tmp_path / "m.pt", tmp_path / "m.onnx")
    onnx = Predictor.from_onnx(tmp_path / "m.onnx")
    assert model_mpp(onnx) == (0.972, "ONNX metadata")
    path, _ = slides["tumour"]
    a = analyse_slide(bundled, path, tmp_path / "torch", workers=0, progress=False)
    b = analyse_slide(onnx, path, tmp_path / "onnx", workers=0, progress=False)
    assert a.error == b.error == ""
    ta, tb = (pd.read_csv(tmp_path / d / "tiles.csv") for d in ("torch", "onnx"))
    assert (ta[["x", "y"]] == tb[["x", "y"]]).all().all()
    np.testing.assert_allclose(ta["p_malignant"], tb["p_malignant"], atol=1e-4)


@pytest.mark.slow
def test_auto_backend_runs_onnx_on_a_cpu_with_the_same_answers(bundled, tmp_path):
    pytest.importorskip("onnxruntime")
    fast = bundled.on_backend("float32", cache_dir=tmp_path)
    assert fast.backend == "onnx" and fast.backend_note == "ONNX Runtime (CPU)"
    assert fast.threshold == bundled.threshold and fast.trained_model is bundled.trained_model
    assert model_mpp(fast) == (0.972, "checkpoint")
    (cached,) = (tmp_path / "onnx").glob("patch_cnn-*.onnx")
    stamp = cached.stat().st_mtime_ns
    x = torch.randn(5, 3, 96, 96)
    np.testing.assert_allclose(fast.probabilities(x), bundled.probabilities(x), atol=1e-4)
    again = bundled.on_backend("float32", cache_dir=tmp_path)  # reuses the export
    assert again.backend == "onnx" and cached.stat().st_mtime_ns == stamp
    # auto: the int8 model the bundled checkpoint carries (its gate: docs, model card).
    auto = bundled.on_backend("auto", cache_dir=tmp_path)
    assert auto.backend_note == "ONNX Runtime (CPU, int8)" and auto.threshold == fast.threshold
    assert bundled.on_backend("torch") is bundled and fast.on_backend("auto") is fast
    with pytest.raises(UserError, match="checkpoint"):
        fast.on_backend("torch")


@pytest.mark.slow
def test_a_read_error_mid_slide_is_that_slide_s_error_row(bundled, slides, tmp_path,
                                                          monkeypatch):
    calls = {"n": 0}
    real = openslide.OpenSlide.read_region

    def flaky(self, location, level, size):
        calls["n"] += 1
        if level == 1 and calls["n"] > 3:  # tiles are read in strips of 96 px high
            raise openslide.OpenSlideError("TIFFRGBAImageGet failed")
        return real(self, location, level, size)

    monkeypatch.setattr(openslide.OpenSlide, "read_region", flaky)
    path, _ = slides["tumour"]
    for workers in (0, 1):  # read in this process, or in a DataLoader worker
        calls["n"] = 0
        r = analyse_slide(bundled, path, tmp_path / f"t{workers}", workers=workers,
                          progress=False)
        assert r.error.startswith(f"{path}: damaged or truncated slide: reading ")
        assert "x96 px at" in r.error
        assert "Traceback" not in r.error and "worker" not in r.error
        assert not (tmp_path / f"t{workers}" / "slide.json").exists()


@pytest.mark.parametrize("level, read_size", [(1, 96), (0, 192)])
def test_strips_read_the_pixels_of_one_call_per_tile(slides, level, read_size):
    path, _ = slides["tumour"]
    slide = open_slide(path)
    cols, rows = (d // 192 for d in slide.dimensions)
    slide.close()
    keep = [(r, c) for r in range(rows) for c in range(cols) if (r * cols + c) % 7 != 3]
    xy = np.array([[c * 192, r * 192] for r, c in keep])
    ds = TileDataset(path, xy, level, read_size, 96)
    runs = ds.runs(0, len(ds))
    assert sum(k for _, k in runs) == len(ds) and max(k for _, k in runs) <= ds.MAX_RUN
    assert max(k for _, k in runs) > 2  # strips, not one call a tile
    for first, k in runs:  # one row, side by side
        assert len(set(xy[first:first + k, 1])) == 1
        assert (np.diff(xy[first:first + k, 0]) == 192).all()
    batch = ds.read_batch(3, len(ds))
    assert ds.reads_direct  # strips cut from the TIFF's own tiles...
    assert batch.shape == (len(ds) - 3, 3, 96, 96) and batch.dtype == torch.uint8
    each = torch.stack([ds[i][0] for i in range(3, len(ds))])  # ...OpenSlide, tile by tile
    assert torch.equal(batch, each)
    by_openslide = TileDataset(path, xy, level, read_size, 96, direct=False)
    assert torch.equal(by_openslide.read_batch(3, len(ds)), each)
    assert not by_openslide.reads_direct
    by_workers = list(ds.batches(10, workers=1))
    by_thread = list(ds.batches(10, workers=0))
    sizes = [len(i) for _, i in by_thread]
    # The fewest batches of at most 10, sizes equal within one, every tile once in order.
    assert len(sizes) == -(-len(ds) // 10) and max(sizes) <= 10 and max(sizes) - min(sizes) <= 1
    assert torch.equal(torch.cat([i for _, i in by_thread]), torch.arange(len(ds)))
    for (a, i), (b, j) in zip(by_workers, by_thread):
        assert torch.equal(a, b) and torch.equal(i, j)
    # For two lanes: an even number of batches, so that both finish together.
    assert len(ds.batches_by_index(10, multiple_of=2)) % 2 == 0
    for n, size, lanes, expect in [(557, 64, 2, 10), (557, 64, 1, 9), (3, 64, 2, 2),
                                   (1, 64, 2, 1), (128, 64, 2, 2), (130, 64, 2, 4)]:
        b = _Batches(range(n), size, lanes)  # only the tiles' count matters to the bounds
        assert len(b) == expect, (n, size, lanes)
        assert b.bounds[0] == 0 and b.bounds[-1] == n
        assert max(np.diff(b.bounds)) <= size and np.ptp(np.diff(b.bounds)) <= 1


@pytest.mark.slow
def test_two_lanes_score_every_tile_as_one_lane_does(bundled, slides, tmp_path, monkeypatch):
    import threading

    import breast_cancer_detection.slides.run as run_module

    pytest.importorskip("onnxruntime")
    fast = bundled.on_backend("onnx", cache_dir=tmp_path)
    import breast_cancer_detection.inference.predictor as inference_module

    monkeypatch.setattr(inference_module.os, "cpu_count", lambda: 2)
    assert fast.lanes(0) == 2 and fast.lanes(1) == 1 and bundled.lanes(0) == 1
    path, _ = slides["tumour"]
    xy = np.array([[c * 192, r * 192] for r in range(8) for c in range(10)])
    one = run_module.score_tiles(fast, TileDataset(path, xy, 1, 96, 96), batch_size=7,
                                 workers=1)
    two = run_module.score_tiles(fast, TileDataset(path, xy, 1, 96, 96), batch_size=7,
                                 workers=0)
    assert np.isfinite(two).all()
    np.testing.assert_allclose(two, one, atol=1e-5)

    real = TileDataset.read_batch

    def failing(self, start, stop):
        if start >= 35:
            raise SlideError(f"{path}: damaged or truncated slide: reading at {start}")
        return real(self, start, stop)

    monkeypatch.setattr(TileDataset, "read_batch", failing)
    before = threading.active_count()
    with pytest.raises(SlideError, match="damaged or truncated"):
        run_module.score_tiles(fast, TileDataset(path, xy, 1, 96, 96), batch_size=7, workers=0)
    assert threading.active_count() == before  # the other lane stopped and was joined


@pytest.mark.parametrize("compression", ["zlib", "jpeg"])
def test_tiff_tiles_give_openslides_pixels_everywhere_edges_included(tmp_path, compression):
    from breast_cancer_detection.slides.reader import TiffLevel

    if compression == "jpeg":
        pytest.importorskip("imagecodecs")
    rng = np.random.default_rng(3)
    # Tissue-like smooth colour with noise; 704x528 so that the edge tiles of every level are
    # partial (256 px TIFF tiles) and every downsample is a whole number (1, 2, 4).
    yy, xx = np.mgrid[:528, :704]
    image = np.stack([128 + 100 * np.sin(xx / 37), 128 + 100 * np.cos(yy / 23),
                      128 + 60 * np.sin((xx + yy) / 51)], -1) + rng.normal(0, 6, (528, 704, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    path = write_slide(tmp_path / "s.tif", image, mpp=0.25, min_side=100,
                       compression=compression)
    slide = open_slide(path)
    assert list(slide.level_downsamples) == [1, 2, 4]
    for level in range(slide.level_count):
        tiff = TiffLevel.for_level(slide, path, level)
        assert tiff is not None
        ds = round(slide.level_downsamples[level])
        w, h = slide.level_dimensions[level]
        # Inside, across TIFF tile borders, and past the right and bottom edges (white).
        for x, y, rw, rh in [(0, 0, 40, 30), (250, 240, 20, 30), (w - 30, h - 20, 50, 45),
                             (w - 5, 3, 17, 9)]:
            ref = np.asarray(open_rgb(slide.read_region((x * ds, y * ds), level, (rw, rh)),
                                      max_pixels=None))
            np.testing.assert_array_equal(tiff.read(x, y, rw, rh), ref)
        tiff.close()
    slide.close()


def test_direct_reads_fall_back_to_openslide_where_they_cannot_serve(slides, monkeypatch):
    from breast_cancer_detection.slides import reader as reader_module

    path, _ = slides["tumour"]
    xy = np.array([[c * 192, 192] for c in range(4)] + [[193, 384]])
    by_openslide = TileDataset(path, xy, 1, 96, 96, direct=False).read_batch(0, 5)

    # A tile that will not decode: OpenSlide reads that strip, the others stay direct.
    calls = []
    real_tile = reader_module.TiffLevel.tile

    def tile(self, index):
        calls.append(index)
        if len(calls) > 3:  # zlib.error: an Exception, not a ValueError or OSError
            raise zlib.error("Error -3 while decompressing data: invalid distance")
        return real_tile(self, index)

    monkeypatch.setattr(reader_module.TiffLevel, "tile", tile)
    ds = TileDataset(path, xy, 1, 96, 96)
    assert torch.equal(ds.read_batch(0, 5), by_openslide) and ds.reads_direct
    monkeypatch.setattr(reader_module.TiffLevel, "tile", real_tile)

    # 193 is half a level pixel off the level-1 grid: only OpenSlide reads there.
    ds = TileDataset(path, xy[4:], 1, 96, 96)
    assert ds._read_direct(193, 384, 96, 96) is None
    assert torch.equal(ds.read_batch(0, 1), by_openslide[4:])

    # Pixels that differ from OpenSlide's on the first strip: the slide is read by OpenSlide,
    # with a warning, and the direct reader is not used again.
    ds = TileDataset(path, xy, 1, 96, 96)
    assert ds.reads_direct  # opened: its first TIFF tile matched OpenSlide's
    real_read = reader_module.TiffLevel.read
    monkeypatch.setattr(reader_module.TiffLevel, "read",
                        lambda self, *a: 255 - real_read(self, *a))
    with pytest.warns(UserWarning, match="OpenSlide reads this slide"):
        got = ds.read_batch(0, 5)
    assert torch.equal(got, by_openslide) and not ds.reads_direct
    assert torch.equal(ds.read_batch(0, 5), by_openslide)


def test_decoded_tiff_tiles_are_cached_within_a_bound(slides, monkeypatch):
    from breast_cancer_detection.slides.reader import TiffLevel

    path, _ = slides["tumour"]
    slide = open_slide(path)
    tiff = TiffLevel.for_level(slide, path, 0)
    slide.close()
    one = 256 * 256 * 3
    # Three rows of TIFF tiles by default (the 1920 px wide level: 8 tiles a row).
    assert tiff.across == 8 and tiff.cache_bytes == 3 * 8 * one
    tiff.close()
    monkeypatch.setattr(TiffLevel, "CACHE_BYTES", 3 * one)  # the cap wins when smaller
    slide = open_slide(path)
    tiff = TiffLevel.for_level(slide, path, 0)
    slide.close()
    assert tiff.cache_bytes == 3 * one
    first = tiff.tile(0)
    assert tiff.tile(0) is first  # a cached tile is not decoded again
    for i in range(1, 6):
        tiff.tile(i)
    assert len(tiff._cache) == 3 and tiff._cached_bytes == 3 * one
    assert list(tiff._cache) == [3, 4, 5] and tiff.tile(0) is not first
    tiff.close()


def test_only_tiled_tiff_slides_are_read_directly(tmp_path, monkeypatch):
    from breast_cancer_detection.slides.reader import TiffLevel

    class Other(FakeSlide):
        level_dimensions = [(100, 100)]

    assert TiffLevel.for_level(Other((100, 100), properties={"openslide.vendor": "mirax"}),
                               tmp_path / "x.mrxs", 0) is None
    assert TiffLevel.for_level(Other((100, 100), properties={"openslide.vendor": "generic-tiff"}),
                               tmp_path / "missing.tif", 0) is None
    # A tiled TIFF whose tiles this machine cannot decode (JPEG without imagecodecs): None,
    # so OpenSlide reads it rather than failing strip after strip.
    path = write_slide(tmp_path / "s.tif", np.zeros((300, 300, 3), np.uint8), mpp=0.5)
    slide = open_slide(path)
    assert TiffLevel.for_level(slide, path, 0) is not None

    def no_codec(self, index):
        raise ValueError("<COMPRESSION.JPEG: 7> requires the 'imagecodecs' package")

    monkeypatch.setattr(TiffLevel, "tile", no_codec)
    assert TiffLevel.for_level(slide, path, 0) is None
    # A first tile whose pixels are not OpenSlide's (which the thumbnail also relies on).
    monkeypatch.undo()
    real = TiffLevel.read
    monkeypatch.setattr(TiffLevel, "read", lambda self, *a: 255 - real(self, *a))
    assert TiffLevel.for_level(slide, path, 0) is None
    slide.close()


def test_strips_end_where_a_tile_would_land_off_its_own_place(slides):
    path, _ = slides["tumour"]
    # Neighbours 193 level-0 px apart where a level-1 strip steps 192: the second tile is
    # 1 px (half a level pixel) off, the third 2 px: a new strip starts there.
    xy = np.array([[x, 0] for x in range(0, 193 * 6, 193)])
    assert TileDataset(path, xy, 1, 96, 96).runs(0, 6) == [(0, 2), (2, 2), (4, 2)]
    assert TileDataset(path, xy[:3], 1, 96, 96).runs(1, 3) == [(1, 2)]


@pytest.mark.slow
def test_a_slide_without_tissue_is_reused_with_nan_and_printed_as_n_a(tmp_path, capsys):
    glass = write_slide(tmp_path / "glass.tif", np.full((800, 800, 3), 245, np.uint8),
                        mpp=0.486)
    argv = ["slide", str(glass), "--out", str(tmp_path / "o"), "--quiet"]
    for _ in range(2):  # the second run reuses slide.json, where NaN was written as null
        assert main(argv) == 0
        assert "score n/a, 0 tissue tiles" in capsys.readouterr().out


def test_two_onnx_models_of_one_architecture_are_told_apart(bundled, tmp_path):
    from breast_cancer_detection.export import export_onnx
    from breast_cancer_detection.inference import Predictor
    from breast_cancer_detection.slides.run import _model_identity

    pytest.importorskip("onnxruntime")
    ckpt = bundled.checkpoint
    a = export_onnx(ckpt, tmp_path / "a.onnx", verify=False)
    other = dict(ckpt.state_dict)
    name = next(k for k, v in other.items() if v.dtype.is_floating_point)
    other[name] = other[name] + 0.01
    ckpt2 = type(ckpt)(**{**vars(ckpt), "state_dict": other})
    b = export_onnx(ckpt2, tmp_path / "b.onnx", verify=False)
    ida, idb = (_model_identity(Predictor.from_onnx(p)) for p in (a, b))
    assert ida["arch"] == idb["arch"] and ida["onnx"] != idb["onnx"]
    assert _model_identity(bundled)["weights"] != _model_identity(
        Predictor.from_loaded(ckpt2, device="cpu"))["weights"]


def test_output_names_never_collide():
    from breast_cancer_detection.files import unique_stems

    assert unique_stems([Path("a/x.svs"), Path("b/x.svs"), Path("x-2.svs")]) == [
        "x", "x-2", "x-2-2"]


@pytest.mark.slow
def test_a_previous_run_s_part_is_not_merged(bundled, slides, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / "slides.part-1-of-2.csv"
    stale.write_text("slide,folder,error\nold.svs,old,\n")
    paths = [slides["tumour"][0], slides["normal"][0]]
    analyse_slides(bundled, paths, out, shard=(1, 2), workers=0, progress=False)
    assert "old.svs" not in stale.read_text()  # replaced by this run's share
    assert not (out / "slides.csv").exists() and not list(out.glob("*.partial.csv"))
    analyse_slides(bundled, paths, out, shard=(0, 2), workers=0, progress=False)
    merged = pd.read_csv(out / "slides.csv", keep_default_na=False)
    assert list(merged["folder"]) == ["tumour", "normal"]
    # Another run's part (other slides) is never merged, and a new sharded run starts
    # without the old table.
    stale.write_text("slide,folder,error\nold.svs,old,\n")
    analyse_slides(bundled, paths, out, shard=(0, 2), workers=0, progress=False)
    assert not (out / "slides.csv").exists()


@pytest.mark.slow
def test_slides_never_import_torchvision(slides, tmp_path):
    # torchvision's import costs about 2 s of every `bcd slide` command's start; nothing on
    # the slide path needs it (tiles are normalised per batch).
    import subprocess
    import sys

    path, _ = slides["normal"]
    code = ("import sys; from breast_cancer_detection.cli import main; "
            f"rc = main(['slide', {str(path)!r}, '--out', {str(tmp_path / 'o')!r}, "
            "'--quiet', '--backend', 'torch']); "
            "print('torchvision' in sys.modules, rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.split()[-2:] == ["False", "0"], out.stdout + out.stderr

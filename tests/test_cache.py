"""The prepared image cache: exact pixels, staleness, bad images, loaders, interrupted builds."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from breast_cancer_detection.cli import main
from breast_cancer_detection.data import cache as cache_mod
from breast_cancer_detection.data.breakhis import build_index
from breast_cancer_detection.data.cache import (
    CACHE_VERSION,
    CachedImageDataset,
    ImageCache,
    StaleCacheError,
    StaleCacheWarning,
    default_cache_dir,
    find_cache,
    open_cache,
    prepare_cache,
)
from breast_cancer_detection.data.datasets import (
    EpochSampler,
    ImageTableDataset,
    collate_skip_bad,
)
from breast_cancer_detection.data.transforms import (
    Augmentation,
    Preprocessing,
    build_eval_transform,
    build_train_transform,
)

SIZE = 32  # fake images are 70x46, so the cache holds 48x32 (long side int(32 * 70 / 46))


@pytest.fixture
def tree(fake_breakhis, tmp_path, monkeypatch) -> Path:
    """A private copy of the fake BreakHis tree (tests change files), with the cwd in tmp."""
    root = tmp_path / "BreaKHis_v1"
    shutil.copytree(fake_breakhis, root)  # copy2 keeps mtimes, as a real copy would not need
    monkeypatch.chdir(tmp_path)
    return root


@pytest.fixture(scope="module")
def built(fake_breakhis, tmp_path_factory):
    """A cache of the shared fake tree, built once with a 2-process pool (read-only use)."""
    out = tmp_path_factory.mktemp("cache") / "c"
    index = build_index(fake_breakhis)
    prepare_cache(fake_breakhis, index, SIZE, out, progress=False, workers=2)
    return fake_breakhis, index, out


def _stale_message(root: Path, size: int = SIZE) -> str:
    return f"run `bcd prepare {root} --size {size}` again"


# ---------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------


def test_cached_pixels_equal_direct_decoding(built):
    root, index, out = built
    cache = open_cache(out, root, index)
    assert cache.shape == (len(index), 32, 48, 3)
    rows = cache.rows_for(index["path"].tolist())
    for k in (0, 7, len(index) - 1):
        path = index["path"].iloc[k]
        want = Image.open(root / path).convert("RGB").resize((48, 32), Image.Resampling.BILINEAR)
        got = cache.array()[rows[k]]
        assert np.array_equal(got, np.asarray(want)), path
    # The images differ from one another, so a cache of one repeated image would fail above.
    assert not np.array_equal(cache.array()[rows[0]], cache.array()[rows[7]])


def test_eval_from_cache_at_resize_equals_eval_from_files(built):
    # A cache made at size == Preprocessing.resize gives the evaluation tensors the files give.
    root, index, out = built
    cache = open_cache(out, root, index)
    tf = build_eval_transform(pre=Preprocessing(size=24, resize=SIZE))
    files = ImageTableDataset(root, index, tf)
    cached = CachedImageDataset(cache, index, tf)
    for i in (0, 3, 11):
        a, b = files[i], cached[i]
        assert torch.equal(a[0], b[0])
        assert a[1:] == b[1:]


@pytest.mark.parametrize("shape", [(46, 46), (46, 120)], ids=["taller", "wider"])
def test_other_aspect_is_centre_cropped_not_stretched(tree, shape):
    # An odd-shaped image among 70x46 ones: blue, with red bands at the two ends that cropping
    # to the 70:46 aspect removes (rows for the square, columns for the wide one); a stretch
    # would keep them.
    h, w = shape
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, :, 2] = 200
    band = (250, 0, 0)
    if h == w:
        arr[:4] = arr[-4:] = band
    else:
        arr[:, :20] = arr[:, -20:] = band
    rel = ("histology_slides/breast/benign/SOB/adenosis/SOB_B_A_14-22549AB/40X/"
           "SOB_B_A-14-22549AB-40-099.png")
    Image.fromarray(arr).save(tree / rel)
    index = build_index(tree)
    out = prepare_cache(tree, index, SIZE, progress=False, workers=0)
    cache = open_cache(out, tree, index)
    assert cache.shape[1:] == (32, 48, 3)  # the most common shape decides
    got = cache.array()[cache.rows_for([rel])[0]]
    assert got[..., 0].max() < 20, "red bands survived: the image was stretched, not cropped"
    assert got[..., 2].min() > 180
    stretched = np.asarray(Image.fromarray(arr).resize((48, 32), Image.Resampling.BILINEAR))
    assert stretched[..., 0].max() > 200  # the check above would catch a stretch


def test_default_cache_dir_is_under_cwd_and_keyed_by_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a" / "data").mkdir(parents=True)
    (tmp_path / "b" / "data").mkdir(parents=True)
    d = default_cache_dir(tmp_path / "a" / "data", 256)
    assert d.parent == tmp_path / "data" / "cache"
    assert d.name.startswith("data-") and d.name.endswith("-256px")
    assert len(d.name.split("-")[1]) == 8
    assert default_cache_dir(tmp_path / "b" / "data", 256) != d
    assert default_cache_dir(tmp_path / "a" / "data", 224) != d
    assert default_cache_dir("a/data", 256) == d  # relative and absolute roots agree


# ---------------------------------------------------------------------------------------------
# Staleness
# ---------------------------------------------------------------------------------------------


def _prepared(tree: Path):
    index = build_index(tree)
    prepare_cache(tree, index, SIZE, progress=False, workers=0)
    assert find_cache(tree, index, SIZE) is not None
    return index


def _assert_stale(tree: Path, index: pd.DataFrame, *fragments: str) -> None:
    d = default_cache_dir(tree, SIZE)
    with pytest.raises(StaleCacheError) as e:
        open_cache(d, tree, index)
    for f in (*fragments, _stale_message(tree)):
        assert f in str(e.value)
    with pytest.warns(StaleCacheWarning, match="not using the image cache"):
        assert find_cache(tree, index, SIZE) is None


def test_touched_file_makes_cache_stale(tree):
    index = _prepared(tree)
    f = tree / index["path"].iloc[4]
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    _assert_stale(tree, index, str(f), "modified")


def test_changed_bytes_make_cache_stale_even_with_mtime_restored(tree):
    index = _prepared(tree)
    f = tree / index["path"].iloc[2]
    st = f.stat()
    f.write_bytes(f.read_bytes() + b"\0")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    _assert_stale(tree, index, str(f), f"{st.st_size + 1} bytes")


def test_added_file_makes_cache_stale(tree):
    _prepared(tree)
    src = next(tree.rglob("*.png"))
    new = src.with_name(src.name.replace(src.stem[-3:], "777"))
    shutil.copy(src, new)
    index = build_index(tree)
    _assert_stale(tree, index, new.relative_to(tree).as_posix(), "not in the cache")


def test_removed_file_makes_cache_stale(tree):
    old_index = _prepared(tree)
    gone = tree / old_index["path"].iloc[5]
    gone.unlink()
    _assert_stale(tree, old_index, str(gone), "no longer exists")
    # The new index no longer asks for it: the rest of the cache still serves.
    assert open_cache(default_cache_dir(tree, SIZE), tree, build_index(tree)) is not None


def test_a_subset_of_the_index_is_served(tree):
    index = _prepared(tree)
    subset = index.iloc[::2]
    cache = open_cache(default_cache_dir(tree, SIZE), tree, subset)
    assert len(cache.rows_for(subset["path"].tolist())) == len(subset)
    # Files outside the subset may change without making the subset stale ...
    other = tree / index["path"].iloc[1]
    st = other.stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert open_cache(default_cache_dir(tree, SIZE), tree, subset) is not None
    # ... but the full index now is.
    _assert_stale(tree, index, str(other), "modified")


def test_fresh_again_after_prepare_and_index_order_does_not_matter(tree):
    index = _prepared(tree)
    f = tree / index["path"].iloc[0]
    os.utime(f, ns=(0, 0))
    with pytest.warns(StaleCacheWarning):
        assert find_cache(tree, index, SIZE) is None
    prepare_cache(tree, index, SIZE, progress=False, workers=0)
    shuffled = index.sample(frac=1.0, random_state=0)
    assert list(shuffled["path"]) != list(index["path"])
    cache = find_cache(tree, shuffled, SIZE)
    assert isinstance(cache, ImageCache)


def test_other_version_or_size_is_not_used(tree):
    index = _prepared(tree)
    d = default_cache_dir(tree, SIZE)
    with pytest.warns(StaleCacheWarning, match="not 40 px"):
        assert find_cache(tree, index, 40, cache_dir=d) is None
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["version"] = CACHE_VERSION + 1
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StaleCacheError, match=f"version {CACHE_VERSION + 1}"):
        open_cache(d, tree, index)


def test_absent_cache_is_none_without_warning(tree, recwarn):
    assert find_cache(tree, build_index(tree), SIZE) is None
    assert not [w for w in recwarn if issubclass(w.category, StaleCacheWarning)]
    with pytest.raises(StaleCacheError, match="manifest.json is missing"):
        open_cache(tree / "nowhere", tree, build_index(tree))


# ---------------------------------------------------------------------------------------------
# Bad images and interrupted builds
# ---------------------------------------------------------------------------------------------


def test_bad_images_recorded_and_served_as_none(tree):
    folder = tree / "histology_slides/breast/malignant/SOB/ductal_carcinoma/SOB_M_DC_14-2523/40X"
    (folder / "SOB_M_DC-14-2523-40-098.png").write_bytes(b"this is not a png")
    (folder / "SOB_M_DC-14-2523-40-099.png").write_bytes(b"")
    index = build_index(tree)
    out = prepare_cache(tree, index, SIZE, progress=False, workers=2)
    bad = json.loads((out / "manifest.json").read_text())["bad"]
    garbage = "histology_slides/breast/malignant/SOB/ductal_carcinoma/SOB_M_DC_14-2523/40X/" \
              "SOB_M_DC-14-2523-40-098.png"
    empty = garbage.replace("098", "099")
    assert set(bad) == {garbage, empty}
    assert "not a readable image" in bad[garbage] and "empty file" in bad[empty]

    cache = find_cache(tree, index, SIZE)
    assert cache.bad == bad
    assert not cache.array()[cache.rows_for([garbage, empty])].any()  # left as zeros
    ds = CachedImageDataset(cache, index, as_uint8=True)
    i = ds.paths.index(garbage)
    item = ds[(i, 123)]
    assert item[0] is None and item[1] == i and "not a readable image" in item[2]
    batch = collate_skip_bad([ds[i], ds[0], ds[ds.paths.index(empty)]])
    assert batch["x"].shape == (1, 3, 32, 48)
    assert [r for r, _ in batch["bad"]] == [i, ds.paths.index(empty)]


def test_uint8_batches_collate_channels_last_with_the_same_pixels(tree):
    index = _prepared(tree)
    ds = CachedImageDataset(find_cache(tree, index, SIZE), index, as_uint8=True)
    items = [ds[k] for k in range(4)]
    batch = collate_skip_bad(items)["x"]
    # Stacked as the HWC rows they are: channels-last, the layout the CPU resize reads fastest.
    assert batch.shape == (4, 3, 32, 48) and batch.dtype == torch.uint8
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack([item[0].contiguous() for item in items]))
    # Anything else stacks as torch.stack does.
    plain = collate_skip_bad([(torch.ones(3, 4, 5), 0, 0), (torch.zeros(3, 4, 5), 1, 1)])["x"]
    assert plain.is_contiguous() and plain.shape == (2, 3, 4, 5)
    # Collated in a worker, the batch reaches the main process with its layout and pixels.
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1,
                                         collate_fn=collate_skip_bad)
    from_worker = next(iter(loader))["x"]
    assert from_worker.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(from_worker, batch)


def test_interrupted_build_leaves_no_valid_cache(tree, monkeypatch):
    index = _prepared(tree)  # an older, valid cache is there too
    d = default_cache_dir(tree, SIZE)
    real, calls = cache_mod._decode_one, []

    def failing(task):
        calls.append(task)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(task)

    monkeypatch.setattr(cache_mod, "_decode_one", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_cache(tree, index, SIZE, progress=False, workers=0)
    assert len(calls) == 3  # it did fail mid-build, after writing two images
    assert not (d / "manifest.json").exists()
    assert not list(d.glob("*.partial"))
    with pytest.warns(StaleCacheWarning, match="manifest.json is missing"):
        assert find_cache(tree, index, SIZE) is None

    fresh = tree.parent / "fresh"
    with pytest.raises(RuntimeError):
        calls.clear()
        prepare_cache(tree, index, SIZE, fresh, progress=False, workers=0)
    assert fresh.is_dir() and not list(fresh.iterdir())  # no manifest, no images.npy, no temp


# ---------------------------------------------------------------------------------------------
# Dataset, loaders, pickling
# ---------------------------------------------------------------------------------------------


def _train_ds(built, size: int = 24) -> CachedImageDataset:
    root, index, out = built
    tf = build_train_transform(pre=Preprocessing(size=size, resize=SIZE), aug=Augmentation())
    return CachedImageDataset(open_cache(out, root, index), index, tf)


def test_seeded_items_are_deterministic_per_seed(built):
    ds = _train_ds(built)
    before = torch.random.get_rng_state()
    a, b, c = ds[(3, 1234)], ds[(3, 1234)], ds[(3, 1235)]
    assert torch.equal(torch.random.get_rng_state(), before)  # the global stream is untouched
    assert a[0].shape == (3, 24, 24) and a[0].dtype == torch.float32
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], c[0])
    assert a[1] == ds.targets[3] and a[2] == 3


def test_same_augmentation_as_files_when_no_resize_is_needed(fake_breakhis, tmp_path):
    # Cached at the files' own short side (46), the pixels are the decoded file's, so a seeded
    # item must equal ImageTableDataset's exactly.
    index = build_index(fake_breakhis).iloc[:6]
    out = prepare_cache(fake_breakhis, index, 46, tmp_path / "c46", progress=False, workers=0)
    tf = build_train_transform(pre=Preprocessing(size=24, resize=32), aug=Augmentation())
    cached = CachedImageDataset(open_cache(out, fake_breakhis, index), index, tf)
    files = ImageTableDataset(fake_breakhis, index, tf)
    for key in ((0, 7), (5, 99)):
        assert torch.equal(cached[key][0], files[key][0])


def _batches(ds, workers: int) -> list[dict]:
    loader = torch.utils.data.DataLoader(
        ds, batch_size=8, sampler=EpochSampler(len(ds), seed=3, epoch=1),
        num_workers=workers, collate_fn=collate_skip_bad)
    return list(loader)


def test_loader_batches_equal_with_0_and_2_workers(built):
    ds = _train_ds(built, size=16)
    one, two = _batches(ds, 0), _batches(ds, 2)
    assert len(one) == len(two) == -(-len(ds) // 8)
    for a, b in zip(one, two):
        assert torch.equal(a["rows"], b["rows"])
        assert torch.equal(a["x"], b["x"])
    other = torch.utils.data.DataLoader(
        ds, batch_size=8, sampler=EpochSampler(len(ds), seed=3, epoch=2),
        collate_fn=collate_skip_bad)
    assert not torch.equal(next(iter(other))["x"], one[0]["x"])  # a new epoch is augmented anew


def test_uint8_items_are_the_cached_pixels(built):
    root, index, out = built
    cache = open_cache(out, root, index)
    ds = CachedImageDataset(cache, index, as_uint8=True)
    x, target, row = ds[(9, 5)]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 48)
    want = cache.array()[cache.rows_for([ds.paths[9]])[0]]
    assert np.array_equal(x.permute(1, 2, 0).numpy(), want)
    assert (target, row) == (ds.targets[9], 9)
    with pytest.raises(ValueError, match="transform=None"):
        CachedImageDataset(cache, index, build_eval_transform(pre=Preprocessing()), as_uint8=True)
    with pytest.raises(ValueError, match="as_uint8=True"):
        CachedImageDataset(cache, index)


def test_rows_for_names_the_missing_path(built):
    root, index, out = built
    cache = open_cache(out, root, index)
    assert cache.rows_for([index["path"].iloc[1]]).tolist() == [cache.paths.index(
        index["path"].iloc[1])]
    with pytest.raises(KeyError, match="nope/missing.png"):
        cache.rows_for([index["path"].iloc[0], "nope/missing.png"])


def test_pickled_cache_maps_the_file_again(built):
    root, index, out = built
    cache = open_cache(out, root, index)
    full = np.array(cache.array())  # maps it in this process first
    blob = pickle.dumps(cache)
    assert len(blob) < full.nbytes / 4, "the pickle carried the pixels"
    copy = pickle.loads(blob)
    assert copy._array is None
    assert isinstance(copy.array(), np.memmap) and not copy.array().flags.writeable
    assert np.array_equal(copy.array(), full)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_prepare(tree, capsys):
    assert main(["prepare", str(tree), "--size", str(SIZE), "--workers", "0", "--quiet"]) == 0
    out = capsys.readouterr().out
    d = default_cache_dir(tree, SIZE)
    assert str(d) in out
    assert " MB on disk" in out and "images/s" in out
    assert f"bcd train --data {tree}" in out
    cache = find_cache(tree, build_index(tree), SIZE)
    assert cache is not None and cache.shape == (len(build_index(tree)), 32, 48, 3)


def test_cli_prepare_reports_a_missing_folder(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "absent"), "--size", "8", "--quiet"]) == 2
    assert "absent: no such folder" in capsys.readouterr().err

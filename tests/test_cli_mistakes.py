"""Ordinary mistakes on the command line get one line that says what to do, never a traceback,
and never an answer that looks meaningful when it is not."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from breast_cancer_detection.checkpoint import load_checkpoint, save_checkpoint
from breast_cancer_detection.cli import main
from breast_cancer_detection.inference import Predictor, collect_images
from breast_cancer_detection.models import WeightsError, read_state_dict


def _images(fake_breakhis, n=2):
    return sorted(fake_breakhis.rglob("*.png"))[:n]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_predict_lists_relative_and_absolute_paths_together(trained, fake_breakhis, tmp_path,
                                                             monkeypatch, capsys):
    first, second = _images(fake_breakhis)
    monkeypatch.chdir(first.parent)
    out = tmp_path / "p.csv"
    assert main(["predict", str(trained), first.name, str(second), "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert first.name in printed and second.name in printed and out.is_file()


def test_out_naming_a_folder_writes_the_csv_inside_it(trained, fake_breakhis, tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    assert main(["predict", str(trained), str(_images(fake_breakhis)[0]), "--out", str(folder),
                 "--quiet"]) == 0
    assert (folder / "predictions.csv").is_file()
    assert main(["index", str(fake_breakhis), "--out", str(folder)]) == 0
    assert (folder / "index.csv").is_file()
    assert main(["split", str(fake_breakhis), "--out", f"{tmp_path / 'new'}/"]) == 0
    assert (tmp_path / "new" / "split.csv").is_file()


def test_an_unknown_device_is_named_with_the_choices(trained, fake_breakhis, capsys):
    assert main(["predict", str(trained), str(_images(fake_breakhis)[0]),
                 "--device", "gpu"]) == 2
    assert "'gpu' is not a device: use auto, cpu, cuda or cuda:N" in _error(capsys)


def test_a_file_that_is_not_a_checkpoint_gets_no_advice_to_drop_weights_only(
        tmp_path, fake_breakhis, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint\n")
    assert main(["predict", str(bad), str(_images(fake_breakhis)[0])]) == 2
    err = _error(capsys)
    assert "cannot be read as a PyTorch checkpoint" in err and "bad.pt" in err
    assert "weights_only" not in err and "arbitrary code" not in err
    with pytest.raises(WeightsError) as e:
        read_state_dict(bad)
    assert "not a .pt file" in str(e.value) and "weights_only" not in str(e.value)


def test_serve_without_the_app_extra_says_how_to_install_it(trained, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    assert main(["serve", str(trained)]) == 2
    assert 'pip install -e ".[app]"' in _error(capsys)


def test_serve_on_a_port_in_use_says_to_pick_another(trained, capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        assert main(["serve", str(trained), "--port", str(port)]) == 2
    assert f"127.0.0.1:{port}" in (err := _error(capsys)) and "--port" in err


def test_webp_files_in_a_folder_are_found(tmp_path):
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tmp_path / "a.webp")
    assert collect_images([tmp_path]) == [tmp_path / "a.webp"]


@pytest.fixture()
def patch_model(trained, tmp_path):
    """The session's tiny model, stored as if trained at PatchCamelyon's scale."""
    ckpt = load_checkpoint(trained)
    ckpt.mpp = 0.972
    return save_checkpoint(ckpt, tmp_path / "patch.pt")


def test_breakhis_images_given_to_a_model_of_other_tissue_are_flagged(
        patch_model, trained, fake_breakhis, tmp_path, capsys):
    files = _images(fake_breakhis)
    other = tmp_path / "p0001.png"
    shutil.copy(files[0], other)
    note = Predictor.from_checkpoint(patch_model, device="cpu").wrong_data_note(files + [other])
    assert note is not None and note.startswith("2 of these 3 images are BreakHis")
    assert "0.972 um/px" in note and "--model breakhis-patch-cnn" in note
    # Not for other names, nor for a model trained without a stated scale (as on BreakHis).
    assert Predictor.from_checkpoint(patch_model, device="cpu").wrong_data_note([other]) is None
    assert Predictor.from_checkpoint(trained, device="cpu").wrong_data_note(files) is None
    assert main(["predict", str(patch_model), *map(str, files), "--out",
                 str(tmp_path / "p.csv"), "--quiet"]) == 0
    assert "WARNING: 2 of these 2 images are BreakHis" in capsys.readouterr().err


def test_resume_names_a_missing_folder_a_stray_one_and_takes_a_checkpoint_path(
        trained_run, tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in _error(capsys)
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "is not a run folder (it has no config.yaml)" in _error(capsys)
    # last.pt itself names its run; this one has trained all its epochs already.
    assert main(["train", "--resume", str(trained_run / "last.pt")]) == 2
    assert f"{trained_run} already trained 3 epochs" in _error(capsys)


def test_split_shares_and_folds_out_of_range_say_what_fits(fake_breakhis, tmp_path, capsys):
    out = str(tmp_path / "s.csv")
    assert main(["split", str(fake_breakhis), "--out", out, "--val", "0.9", "--test", "0.9"]) == 2
    assert "--val 0.9 and --test 0.9" in _error(capsys)
    assert main(["split", str(fake_breakhis), "--out", out, "--folds", "1"]) == 2
    assert "--folds 1: at least 2" in _error(capsys)


def test_a_run_that_fails_before_its_first_epoch_leaves_no_run_folder(fake_imagefolder,
                                                                      tmp_path, capsys):
    assert main(["train", "--preset", "cpu-smoke", "--data", str(fake_imagefolder),
                 "--runs-dir", str(tmp_path), "--name", "bad", "--model", "no_such_net",
                 "--quiet"]) == 2
    assert "no_such_net" in _error(capsys)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_closing_line_says_how_the_split_was_made(fake_imagefolder, tmp_path, capsys):
    flat = tmp_path / "flat"  # the same images without train/valid folders
    for f in fake_imagefolder.rglob("*.png"):
        dest = flat / f.parent.name / f"{f.parent.parent.name}-{f.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    assert main(["train", "--preset", "cpu-smoke", "--data", str(fake_imagefolder),
                 "--runs-dir", str(tmp_path / "runs"), "--name", "own", "--quiet"]) == 0
    assert "the data folder's own split" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="no patient ids, so this split groups by image"):
        assert main(["train", "--preset", "cpu-smoke", "--data", str(flat), "--runs-dir",
                     str(tmp_path / "runs"), "--name", "flat", "--quiet"]) == 0
    assert "split by image: the data carries no patient ids" in capsys.readouterr().out
    # The split's warning reaches the user as one line, not as a Python source location (in
    # a process of its own: pytest records warnings instead of printing them).
    err = subprocess.run([sys.executable, "-m", "breast_cancer_detection.cli", "split",
                          str(flat), "--out", str(tmp_path / "s.csv")], capture_output=True,
                         text=True, check=True).stderr
    assert err.startswith("warning: The data carries no patient ids")
    assert "UserWarning" not in err and "warnings.warn" not in err


@pytest.mark.slow
def test_evaluate_refuses_a_subset_that_all_images_data_does_not_have(trained, fake_imagefolder,
                                                                       tmp_path, capsys):
    out = ["--out", str(tmp_path / "r"), "--bootstrap", "0", "--quiet"]
    # Data the run never saw is evaluated whole, as one subset: 'val' is not there.
    assert main(["evaluate", str(trained), "--data", str(fake_imagefolder), "--subset", "val",
                 *out]) == 2
    assert "it has no 'val' subset. Drop --subset" in _error(capsys)
    assert main(["evaluate", str(trained), "--data", str(fake_imagefolder), *out]) == 0
    assert capsys.readouterr().out.startswith("all: 48 images")

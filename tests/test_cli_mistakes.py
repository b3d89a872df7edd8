"""Ordinary mistakes on the command line get one line that says what to do, never a traceback,
and never an answer that looks meaningful when it is not."""

from __future__ import annotations

import shutil
import socket
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
    assert "0.972 um/px" in note and "bcd train --preset breakhis-gpu" in note
    # Not for other names, nor for a model trained without a stated scale (as on BreakHis).
    assert Predictor.from_checkpoint(patch_model, device="cpu").wrong_data_note([other]) is None
    assert Predictor.from_checkpoint(trained, device="cpu").wrong_data_note(files) is None
    assert main(["predict", str(patch_model), *map(str, files), "--out",
                 str(tmp_path / "p.csv"), "--quiet"]) == 0
    assert "WARNING: 2 of these 2 images are BreakHis" in capsys.readouterr().err

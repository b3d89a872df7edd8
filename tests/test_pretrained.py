"""Named trained models: the registry (bundled + $BCD_MODELS), resolving names to checked files
(local or downloaded from a server on 127.0.0.1), from_pretrained, and the CLI doors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import breast_cancer_detection as bcd
from breast_cancer_detection import pretrained
from breast_cancer_detection.checkpoint import save_checkpoint, untrained_checkpoint
from breast_cancer_detection.cli import main
from breast_cancer_detection.inference import Predictor
from breast_cancer_detection.pretrained import (
    TrainedModelError,
    list_trained,
    resolve_trained,
    trained_model,
)

from conftest import serve_files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """An untrained 32 px checkpoint: enough to load and predict."""
    return save_checkpoint(untrained_checkpoint("tiny", size=32, resize=None),
                           tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _registry(path: Path, *entries: dict) -> Path:
    path.write_text(yaml.safe_dump({"models": list(entries)}))
    return path


@pytest.fixture
def registry(tmp_path, tiny, monkeypatch) -> Path:
    """A bundled registry with a default entry (the tiny checkpoint, hash-checked) and a
    user registry in $BCD_MODELS with a file entry whose path is relative to it."""
    bundled = _registry(tmp_path / "bundled.yaml",
                        {"name": "tiny-default", "default": True, "task": "tiny test model",
                         "mpp": 0.5, "input_size": 32, "file": str(tiny), "sha256": _sha(tiny),
                         "intended_use": "tests", "not_for": "anything real"})
    user = tmp_path / "user"
    user.mkdir()
    (user / "mine.pt").write_bytes(tiny.read_bytes())
    _registry(user / "models.yaml",
              {"name": "mine", "task": "my own model", "file": "mine.pt", "sha256": None})
    monkeypatch.setattr(pretrained, "BUNDLED_REGISTRY", bundled)
    monkeypatch.setenv("BCD_MODELS", str(user / "models.yaml"))
    monkeypatch.setenv("BCD_CACHE", str(tmp_path / "cache"))
    return bundled


def _image(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_bundled_registry_names_the_shipped_models(capsys):
    # The real registry file, as shipped: images default to the BreakHis model, whole slides
    # to the PCam patch model, both files in the repository's checkpoints/ folder.
    entry = trained_model()
    assert entry.name == "breakhis-patch-cnn" and entry.default and entry.bundled
    assert entry.path == pretrained.REPO_ROOT / "checkpoints" / "breakhis-patch-cnn.pt"
    assert entry.mpp is None and entry.input_size == 224 and not entry.slide_default
    assert "BreakHis" in entry.task and "not a diagnostic" in entry.not_for
    slides = trained_model(slides=True)
    assert slides.name == "pcam-patch-cnn" and slides.slide_default and not slides.default
    assert slides.path == pretrained.REPO_ROOT / "checkpoints" / "pcam-patch-cnn.pt"
    assert (slides.mpp, slides.input_size) == (0.972, 96)
    for e in (entry, slides):
        assert e.intended_use and e.not_for and e.url is None and e.sha256
    assert main(["models", "--trained"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("breakhis-patch-cnn * ") for line in out.splitlines())
    assert any(line.startswith("pcam-patch-cnn + ") for line in out.splitlines())
    assert "+ of `bcd slide`" in out
    assert bcd.trained_model is trained_model and bcd.list_trained is list_trained


def test_list_and_resolve(registry, tiny, tmp_path):
    models = list_trained()
    assert [m.name for m in models] == ["tiny-default", "mine"]
    assert [m.default for m in models] == [True, False]
    assert all(m.present for m in models)
    assert trained_model().name == "tiny-default"
    assert resolve_trained("tiny-default") == tiny
    # A user registry's relative file is relative to that YAML file, not to the cwd.
    assert resolve_trained("mine") == tmp_path / "user" / "mine.pt"
    assert models[0].scale == "0.5 um/px, 32 px" and models[1].scale == "unknown"


def test_sha_mismatch_is_refused_naming_both_hashes(registry, tmp_path, monkeypatch):
    changed = tmp_path / "changed.pt"
    changed.write_bytes(b"not the registered file")
    wrong = "ab" * 32
    _registry(tmp_path / "bad.yaml", {"name": "changed", "task": "t", "file": str(changed),
                                      "sha256": wrong})
    monkeypatch.setenv("BCD_MODELS", str(tmp_path / "bad.yaml"))
    with pytest.raises(TrainedModelError, match="SHA-256 mismatch") as e:
        resolve_trained("changed")
    assert wrong in str(e.value) and _sha(changed) in str(e.value)
    with pytest.raises(TrainedModelError, match="SHA-256 mismatch"):
        Predictor.from_pretrained("changed")


def test_unknown_name_lists_the_known_ones(registry):
    with pytest.raises(TrainedModelError, match="no trained model called 'nope'") as e:
        trained_model("nope")
    assert "tiny-default" in str(e.value) and "mine" in str(e.value)
    assert main(["predict", "--model", "nope", "x.png"]) == 2


def test_bad_registry_entries_are_refused_with_the_fix(registry, tmp_path, monkeypatch):
    cases = {
        "url-without-sha": ({"name": "u", "task": "t", "url": "https://example.org/m.pt"},
                            "needs a `sha256`"),
        "bad-sha": ({"name": "s", "task": "t", "file": "m.pt", "sha256": "abc"},
                    "not a SHA-256"),
        "nowhere": ({"name": "n", "task": "t"}, "give a `file`"),
        "typo": ({"name": "y", "task": "t", "file": "m.pt", "sha": "0" * 64},
                 "unknown field.*sha"),
        "clash": ({"name": "tiny-default", "task": "t", "file": "m.pt"}, "in both"),
    }
    for key, (entry, message) in cases.items():
        monkeypatch.setenv("BCD_MODELS", str(_registry(tmp_path / f"{key}.yaml", entry)))
        with pytest.raises(TrainedModelError, match=message) as e:
            list_trained()
        if key != "clash":
            assert f"{key}.yaml" in str(e.value)  # the message names the file to fix
    monkeypatch.setenv("BCD_MODELS", str(tmp_path / "absent.yaml"))
    with pytest.raises(TrainedModelError, match="no such model registry"):
        list_trained()


def test_missing_bundled_file_says_the_clone_lacks_it(tmp_path, monkeypatch):
    bundled = _registry(tmp_path / "bundled.yaml",
                        {"name": "shipped", "default": True, "task": "t",
                         "file": "checkpoints/shipped.pt", "sha256": None})
    monkeypatch.setattr(pretrained, "BUNDLED_REGISTRY", bundled)
    monkeypatch.setattr(pretrained, "REPO_ROOT", tmp_path)
    monkeypatch.delenv("BCD_MODELS", raising=False)
    assert not trained_model("shipped").present
    with pytest.raises(TrainedModelError, match="not in this copy of the repository") as e:
        resolve_trained("shipped")
    assert "git pull" in str(e.value) and "git clone" in str(e.value)
    # A Git LFS pointer in place of the file is named as such, not loaded as a checkpoint.
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "shipped.pt").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    with pytest.raises(TrainedModelError, match="git lfs pull"):
        resolve_trained("shipped")


@pytest.fixture
def server(tiny):
    with serve_files({"/m/tiny.pt": tiny.read_bytes()}) as handler:
        yield handler


def test_url_entry_is_fetched_once_and_checked(registry, server, tiny, tmp_path, monkeypatch):
    remote = _registry(tmp_path / "remote.yaml",
                       {"name": "remote", "task": "t", "url": f"{server.url}/m/tiny.pt",
                        "sha256": _sha(tiny)},
                       {"name": "remote-wrong", "task": "t", "url": f"{server.url}/m/tiny.pt",
                        "sha256": "0" * 64})
    monkeypatch.setenv("BCD_MODELS", str(remote))
    assert not trained_model("remote").present
    first = resolve_trained("remote", progress=False)
    assert first.read_bytes() == tiny.read_bytes()
    assert str(first).startswith(str(tmp_path / "cache"))  # $BCD_CACHE
    assert trained_model("remote").present
    pred = Predictor.from_pretrained("remote", device="cpu", progress=False)
    assert server.seen == ["/m/tiny.pt"]  # the second use read the cache
    assert pred.trained_model.name == "remote"
    with pytest.raises(bcd.CheckpointError, match="SHA-256 mismatch"):
        resolve_trained("remote-wrong", progress=False)


def test_from_pretrained_predicts(registry, tmp_path):
    pred = bcd.Predictor.from_pretrained(device="cpu")  # the default entry
    assert pred.trained_model.name == "tiny-default" and pred.pre.size == 32
    out = pred.predict(_image(tmp_path / "a.png"))
    assert out[0].error is None and abs(sum(out[0].probabilities.values()) - 1) < 1e-5
    mine = bcd.Predictor.from_pretrained("mine", device="cpu")
    assert mine.trained_model.name == "mine"
    assert mine.predict(tmp_path / "a.png")[0].p_malignant == out[0].p_malignant
    from breast_cancer_detection.app.server import model_card

    card = model_card(pred)
    assert card["trained_model"]["not_for"] == "anything real"
    assert card["trained_model"]["input_size"] == 32
    assert model_card(Predictor.from_checkpoint(resolve_trained("mine")))["trained_model"] is None


def test_bcd_predict_without_a_checkpoint_uses_the_default(registry, tmp_path, capsys):
    image = _image(tmp_path / "a.png")
    out = tmp_path / "p.csv"
    assert main(["predict", str(image), "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "default trained model for images, tiny-default" in err
    assert len(err.strip().splitlines()) == 1
    table = pd.read_csv(out, keep_default_na=False)
    assert table["file"].tolist() == [str(image)] and table["error"].tolist() == [""]
    # A registry name as the first argument, or --model, names the model: no default line.
    assert main(["predict", "mine", str(image), "--out", str(out), "--quiet"]) == 0
    assert main(["predict", "--model", "mine", str(image), "--out", str(out), "--quiet"]) == 0
    assert "default" not in capsys.readouterr().err
    assert main(["predict", "mine", "--quiet"]) == 2  # a model, but no images
    assert "name the image files" in capsys.readouterr().err
    assert main(["predict", "--model", "mine", str(image), "--sha256", "0" * 64]) == 2


def test_bcd_predict_checkpoint_first_still_works(registry, tiny, tmp_path, capsys):
    image = _image(tmp_path / "a.png")
    out = tmp_path / "p.csv"
    assert main(["predict", str(tiny), str(image), "--out", str(out), "--quiet"]) == 0
    assert "default trained model" not in capsys.readouterr().err
    table = pd.read_csv(out, keep_default_na=False)
    assert table["file"].tolist() == [str(image)]  # the checkpoint is not an image row
    assert main(["predict", str(tmp_path / "missing.pt"), str(image), "--quiet"]) == 2
    assert "missing.pt: no such checkpoint" in capsys.readouterr().err
    assert main(["predict", "--model", "mine", str(tiny), str(image), "--quiet"]) == 2
    assert "keep one of them" in capsys.readouterr().err


def test_bcd_serve_without_a_checkpoint_serves_the_default(registry, tiny, monkeypatch,
                                                          capsys):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(app))
    assert main(["serve", "--quiet", "--device", "cpu"]) == 0
    assert "default trained model for images, tiny-default" in capsys.readouterr().err
    assert calls[-1].state.service.predictor.trained_model.name == "tiny-default"
    assert main(["serve", "mine", "--quiet"]) == 0
    assert calls[-1].state.service.predictor.trained_model.name == "mine"
    assert main(["serve", str(tiny), "--quiet"]) == 0
    assert calls[-1].state.service.predictor.trained_model is None
    assert main(["serve", str(tiny), "--model", "mine", "--quiet"]) == 2


def test_bcd_models_trained_prints_the_table(registry, tmp_path, capsys):
    assert main(["models", "--trained"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "task", "scale", "where", "sha256", "present"]
    default = next(line for line in lines if line.startswith("tiny-default *"))
    sha = _sha(Path(trained_model("tiny-default").file))
    assert sha[:12] in default and "0.5 um/px, 32 px" in default and default.endswith("yes")
    mine = next(line for line in lines if line.startswith("mine "))
    assert "unchecked" in mine and "mine.pt" in mine and mine.endswith("yes")
    (tmp_path / "user" / "mine.pt").unlink()
    assert main(["models", "--trained"]) == 0
    mine = next(line for line in capsys.readouterr().out.splitlines()
                if line.startswith("mine "))
    assert mine.endswith("no")

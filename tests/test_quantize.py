"""int8 ONNX export behind an accuracy gate, and the auto backend that picks it up."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from breast_cancer_detection.cli import main
from breast_cancer_detection.errors import UserError

from conftest import SHARED_DATA

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from breast_cancer_detection import int8 as int8_runtime  # noqa: E402
from breast_cancer_detection import quantize  # noqa: E402
from breast_cancer_detection.checkpoint import load_checkpoint  # noqa: E402
from breast_cancer_detection.export import ExportError, write_onnx_metadata  # noqa: E402
from breast_cancer_detection.inference import Predictor  # noqa: E402
from breast_cancer_detection.pretrained import resolve_trained  # noqa: E402
from breast_cancer_detection.slides.make import _synthetic_patch  # noqa: E402

PCAM = SHARED_DATA / "pcam-subset"


# 128 images: the 99%-same-label rule then tolerates one patch that sits on the threshold.
PER_CLASS = 64


@pytest.fixture(scope="module")
def patches(tmp_path_factory) -> Path:
    """0/ and 1/ folders of synthetic 96 px patches (normal and tumour textures)."""
    root = tmp_path_factory.mktemp("patches")
    rng = np.random.default_rng(0)
    for label in (0, 1):
        (root / str(label)).mkdir()
        for i in range(PER_CLASS):
            Image.fromarray(_synthetic_patch(rng, bool(label), 96)).save(
                root / str(label) / f"{i}.png")
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BCD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _patch_batch(patches: Path, ckpt) -> torch.Tensor:
    """Every eighth synthetic patch, normalised as the model expects."""
    x = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1)
                     for f in sorted(patches.rglob("*.png"))[::8]]).float() / 255
    pre = ckpt.pre()
    return (x - torch.tensor(pre.mean).view(3, 1, 1)) / torch.tensor(pre.std).view(3, 1, 1)


def _gate_inputs(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """float32 probabilities of ``n`` labelled images that rank them well, not perfectly."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], n // 2)
    return np.clip(0.3 + 0.4 * y + rng.normal(0, 0.15, n), 0.001, 0.999), y


def test_the_gate_passes_a_faithful_int8_model_and_holds_its_record():
    a, y = _gate_inputs()
    gate = quantize.judge_gate(a, a + 1e-4, y, threshold=0.5)
    assert gate.passed and gate.auc_float32 == gate.auc_int8 and gate.same_label >= 0.99
    assert gate.images == 200 and gate.max_abs_diff == pytest.approx(1e-4)
    assert int8_runtime.gate_holds(dataclasses.asdict(gate))
    assert not int8_runtime.gate_holds(None) and not int8_runtime.gate_holds({"passed": True})


@pytest.mark.parametrize("damage", ["shift", "rank", "auc_record", "label_record"])
def test_the_gate_refuses_an_int8_model_that_moves_answers(damage):
    a, y = _gate_inputs()
    if damage == "shift":  # same order, so the same AUC: only the label rule can refuse it
        gate = quantize.judge_gate(a, 0.5 + a / 2, y, threshold=0.5)
        assert gate.auc_float32 == gate.auc_int8 and gate.same_label < int8_runtime.SAME_LABEL
        record = dataclasses.asdict(gate)
    elif damage == "rank":  # noise reorders the images: the AUC falls
        noisy = np.clip(a + np.random.default_rng(1).normal(0, 0.1, len(a)), 0, 1)
        gate = quantize.judge_gate(a, noisy, y, threshold=0.5)
        assert gate.auc_float32 - gate.auc_int8 > int8_runtime.AUC_TOLERANCE
        record = dataclasses.asdict(gate)
    else:  # a record that says "passed" over figures that do not pass
        record = dataclasses.asdict(quantize.judge_gate(a, a, y, threshold=0.5))
        if damage == "auc_record":
            record["auc_int8"] = record["auc_float32"] - 2 * int8_runtime.AUC_TOLERANCE
        else:
            record["same_label"] = int8_runtime.SAME_LABEL - 0.01
        record["passed"] = True
        assert not int8_runtime.gate_holds(record)
        return
    assert not gate.passed and not int8_runtime.gate_holds({**record, "passed": True})


def test_the_unlabelled_gate_holds_probabilities_within_its_tolerance():
    a, _ = _gate_inputs()
    unknown = np.full(len(a), -1)
    inside = quantize.judge_gate(a, a + int8_runtime.PROB_TOLERANCE * 0.8, unknown, threshold=0.5)
    assert inside.passed and inside.auc_float32 is None and "no labels" in inside.rule
    assert int8_runtime.gate_holds(dataclasses.asdict(inside))
    outside = quantize.judge_gate(a, a + int8_runtime.PROB_TOLERANCE * 1.2, unknown, threshold=0.5)
    assert not outside.passed
    assert not int8_runtime.gate_holds({**dataclasses.asdict(outside), "passed": True})


@pytest.mark.slow
def test_int8_passes_its_gate_and_the_auto_backend_runs_it(patches, cache, tmp_path):
    out, gate = quantize.export_int8(resolve_trained("pcam-patch-cnn"), tmp_path / "m.onnx",
                                     calibration=patches, gate=patches, progress=False)
    assert gate.passed and gate.images == 2 * PER_CLASS and gate.auc_int8 is not None
    assert gate.auc_float32 - gate.auc_int8 <= int8_runtime.AUC_TOLERANCE
    int8 = Predictor.from_onnx(out)
    meta = int8.model.metadata
    assert meta["int8"]["passed"] and meta["int8"]["calibration_images"] == 2 * PER_CLASS
    released = load_checkpoint(resolve_trained("pcam-patch-cnn"))
    assert meta["mpp"] == released.mpp == 0.972
    assert meta["threshold"] == pytest.approx(released.threshold, abs=1e-6)
    assert int8.backend_note == "ONNX Runtime (CPU, int8)"

    torch_model = Predictor.from_pretrained("pcam-patch-cnn", device="cpu", progress=False)
    auto = torch_model.on_backend("auto")  # $BCD_CACHE holds the int8 copy for these weights
    assert auto.backend_note == "ONNX Runtime (CPU, int8)"
    x = _patch_batch(patches, released)
    assert np.abs(auto.probabilities(x) - torch_model.probabilities(x)).max() <= (
        int8_runtime.PROB_TOLERANCE)


@pytest.mark.slow
def test_a_failing_gate_writes_nothing(patches, cache, tmp_path, monkeypatch):
    import onnxruntime.quantization as ort_quantization

    monkeypatch.setattr(quantize, "AUC_TOLERANCE", -1.0)  # no int8 model can pass this
    seen = {}
    real = ort_quantization.quantize_static

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ort_quantization, "quantize_static", spy)
    with pytest.raises(ExportError, match="fails the accuracy gate.*ROC AUC") as e:
        quantize.export_int8(resolve_trained("pcam-patch-cnn"), tmp_path / "m.onnx",
                             calibration=patches, gate=patches, progress=False,
                             settings={"reduce_range": True})
    # The settings given replace the defaults, which stay otherwise; the error says how far.
    assert seen["reduce_range"] is True and seen["per_channel"] is True
    assert isinstance(e.value, quantize.GateFailed) and not e.value.gate.passed
    assert e.value.gate.images == 2 * PER_CLASS
    assert not (tmp_path / "m.onnx").exists()
    assert not list(cache.rglob("*.int8.onnx"))


@pytest.mark.slow
def test_unlabelled_gate_uses_the_probability_rule(patches, cache, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted(patches.rglob("*.png"))[::4]:
        (flat / f"{f.parent.name}-{f.name}").write_bytes(f.read_bytes())
    _, gate = quantize.export_int8(resolve_trained("pcam-patch-cnn"), tmp_path / "m.onnx",
                                   calibration=patches, gate=flat, progress=False)
    assert gate.auc_float32 is None and "no labels" in gate.rule
    assert gate.passed and gate.images == PER_CLASS // 2
    assert gate.max_abs_diff <= int8_runtime.PROB_TOLERANCE


def test_an_int8_model_that_failed_its_gate_is_refused(tmp_path):
    from breast_cancer_detection.export import cached_onnx_path, export_onnx

    released = resolve_trained("pcam-patch-cnn")
    ckpt = load_checkpoint(released)
    path = export_onnx(ckpt, tmp_path / "m.onnx", verify=False)
    write_onnx_metadata(path, int8={"passed": False})
    with pytest.raises(UserError, match="did not pass today's accuracy gate"):
        Predictor.from_onnx(path)
    write_onnx_metadata(path, int8={"passed": True})  # named directly: the figures count too
    with pytest.raises(UserError, match="did not pass today's accuracy gate"):
        Predictor.from_onnx(path)
    # In the cache, "passed" without the gate's figures is not trusted: float32 runs, warned
    # (a checkpoint without an int8 model of its own).
    from breast_cancer_detection.checkpoint import save_checkpoint

    carried, ckpt.int8_onnx = ckpt.int8_onnx, None
    bare = save_checkpoint(ckpt, tmp_path / "bare.pt")
    cache = tmp_path / "cache"
    export_onnx(ckpt, cached_onnx_path(ckpt, cache), verify=False)  # the float32 fallback
    int8 = cached_onnx_path(ckpt, cache, int8=True)
    int8.write_bytes(path.read_bytes())
    write_onnx_metadata(int8, int8={"passed": True})
    torch_model = Predictor.from_checkpoint(bare, device="cpu")
    with pytest.warns(UserWarning, match="not checked by the current accuracy gate"):
        assert torch_model.on_backend("onnx", cache_dir=cache).backend_note == (
            "ONNX Runtime (CPU)")
    # The bundled checkpoint's own int8 model replaces such a copy, and runs.
    bundled = Predictor.from_checkpoint(released, device="cpu")
    assert bundled.on_backend("onnx", cache_dir=cache).backend_note.endswith("int8)")
    assert int8.read_bytes() == carried
    write_onnx_metadata(int8, int8={"passed": True, "auc_float32": None, "max_abs_diff": 0.01})
    assert torch_model.on_backend("onnx", cache_dir=cache).backend_note.endswith("int8)")
    # The probability rule reads the figure, not the flag.
    assert not int8_runtime.gate_holds({"passed": True, "auc_float32": None, "max_abs_diff": 0.06})
    assert not int8_runtime.gate_holds({"passed": True, "auc_float32": 0.9, "same_label": 1.0})


def test_cli_int8_needs_calibration_and_gate(tmp_path, capsys):
    ckpt = str(resolve_trained("pcam-patch-cnn"))
    assert main(["export", ckpt, "--onnx", str(tmp_path / "m.onnx"), "--int8"]) == 2
    assert "--calibration DIR" in capsys.readouterr().err
    assert main(["export", ckpt, "--onnx", str(tmp_path / "m.onnx"), "--int8",
                 "--no-verify"]) == 2
    assert "drop --no-verify" in capsys.readouterr().err
    assert main(["export", ckpt, "--onnx", str(tmp_path / "m.onnx"), "--int8",
                 "--calibration", str(tmp_path / "typo"), "--gate", str(tmp_path)]) == 2
    assert f"{tmp_path / 'typo'}: no such folder" in capsys.readouterr().err


@pytest.mark.slow
def test_a_shift_that_keeps_the_auc_fails_the_gate(patches, cache, tmp_path, monkeypatch):
    """AUC measures ranking only: every probability moved across the threshold keeps it."""
    real = Predictor.predict_table

    def shifted(self, root, table, **kw):
        out = real(self, root, table, **kw)
        if self.model.path.name == "int8.onnx":  # the candidate, not the float32 reference
            out["probability"] = 0.5 + out["probability"] / 2  # same order, all >= 0.5
        return out

    monkeypatch.setattr(Predictor, "predict_table", shifted)
    with pytest.raises(ExportError, match="fails the accuracy gate") as failed:
        quantize.export_int8(resolve_trained("pcam-patch-cnn"), tmp_path / "m.onnx",
                             calibration=patches, gate=patches, progress=False)
    aucs = re.search(r"ROC AUC ([\d.]+) \(float32\) vs ([\d.]+) \(int8\)", str(failed.value))
    # The AUC rule holds (ONNX Runtime's int8 kernels differ between CPUs, so within its
    # tolerance, not equal): the label rule refused it.
    assert float(aucs[1]) - float(aucs[2]) <= int8_runtime.AUC_TOLERANCE
    same = re.search(r"same label for ([\d.]+)%", str(failed.value))
    assert float(same[1]) / 100 < int8_runtime.SAME_LABEL
    assert not int8_runtime.gate_holds({"passed": True, "auc_float32": 0.9, "auc_int8": 0.9,
                                    "same_label": 0.5})


@pytest.mark.slow
def test_a_shift_of_unlabelled_probabilities_fails_the_gate(patches, cache, tmp_path,
                                                            monkeypatch):
    """Without labels every int8 P(malignant) must stay within 0.05 of float32's."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted(patches.rglob("*.png"))[::4]:
        (flat / f"{f.parent.name}-{f.name}").write_bytes(f.read_bytes())
    real = Predictor.predict_table

    def shifted(self, root, table, **kw):
        out = real(self, root, table, **kw)
        if self.model.path.name == "int8.onnx":  # every probability moved by 0.06, inward
            p = out["probability"]
            out["probability"] = np.where(p < 0.5, p + 0.06, p - 0.06)
        return out

    monkeypatch.setattr(Predictor, "predict_table", shifted)
    with pytest.raises(ExportError, match=r"fails the accuracy gate \(every P\(malignant\)"):
        quantize.export_int8(resolve_trained("pcam-patch-cnn"), tmp_path / "m.onnx",
                             calibration=patches, gate=flat, progress=False)
    assert not (tmp_path / "m.onnx").exists()
    assert not list(cache.rglob("*.int8.onnx"))


@pytest.mark.real_data("pcam-subset/train", "pcam-subset/valid")
@pytest.mark.slow
def test_bundled_model_int8_keeps_its_auc_on_pcam_valid(cache, tmp_path, capsys):
    ckpt = str(resolve_trained("pcam-patch-cnn"))
    assert main(["export", ckpt, "--onnx", str(tmp_path / "m.onnx"), "--int8", "--calibration",
                 str(PCAM / "train"), "--gate", str(PCAM / "valid"), "--quiet"]) == 0
    assert "Gate passed" in capsys.readouterr().out
    gate = json.loads(json.dumps(Predictor.from_onnx(tmp_path / "m.onnx").model.metadata))["int8"]
    assert gate["images"] == 3000
    assert gate["auc_float32"] - gate["auc_int8"] <= 0.003
    from test_released_model import _card_figure

    assert gate["auc_float32"] == pytest.approx(_card_figure("ROC AUC, one view"), abs=0.002)


def test_the_bundled_model_carries_an_int8_model_of_its_own_weights(patches, cache):
    from breast_cancer_detection.export import weights_digest

    ckpt = load_checkpoint(resolve_trained("pcam-patch-cnn"))
    assert ckpt.int8_onnx and int8_runtime.int8_of(ckpt, ckpt.int8_onnx) is None
    assert not cache.exists()  # nothing exported or copied before
    torch_model = Predictor.from_pretrained("pcam-patch-cnn", device="cpu", progress=False)
    auto = torch_model.on_backend("auto")
    assert auto.backend_note == "ONNX Runtime (CPU, int8)"
    record = auto.model.metadata["int8"]
    assert record["weights"] == weights_digest(ckpt) and record["images"] == 3000
    assert torch_model.on_backend("float32").backend_note == "ONNX Runtime (CPU)"
    x = _patch_batch(patches, ckpt)
    assert np.abs(auto.probabilities(x) - torch_model.probabilities(x)).max() <= (
        int8_runtime.PROB_TOLERANCE)


def test_an_embedded_int8_model_of_other_weights_is_not_used(tmp_path, cache):
    from breast_cancer_detection.checkpoint import save_checkpoint

    ckpt = load_checkpoint(resolve_trained("pcam-patch-cnn"))
    name = next(k for k, v in ckpt.state_dict.items() if v.is_floating_point())
    ckpt.state_dict = {**ckpt.state_dict, name: ckpt.state_dict[name] + 1e-3}  # "fine-tuned"
    tuned = save_checkpoint(ckpt, tmp_path / "tuned.pt")
    assert load_checkpoint(tuned).int8_onnx == ckpt.int8_onnx  # it came along
    with pytest.warns(UserWarning, match="made from other weights"):
        got = Predictor.from_checkpoint(tuned, device="cpu").on_backend("auto")
    assert got.backend_note == "ONNX Runtime (CPU)"
    (tmp_path / "old.onnx").write_bytes(ckpt.int8_onnx)
    with pytest.raises(ExportError, match="not embedded.*made from other weights"):
        quantize.embed_int8(tuned, tmp_path / "old.onnx")
    # Bytes that are no int8 model of ours: refused with the reason.
    assert "not an int8 model" in int8_runtime.int8_of(ckpt, b"not onnx")


def test_a_checkpoint_keeps_its_int8_model_through_a_weights_only_load(tmp_path):
    from breast_cancer_detection.checkpoint import save_checkpoint

    ckpt = load_checkpoint(resolve_trained("pcam-patch-cnn"))
    raw = torch.load(resolve_trained("pcam-patch-cnn"), weights_only=True)
    assert raw["int8_onnx"].dtype == torch.uint8
    again = load_checkpoint(save_checkpoint(ckpt, tmp_path / "c.pt"))
    assert again.int8_onnx == ckpt.int8_onnx
    ckpt.int8_onnx = None
    assert load_checkpoint(save_checkpoint(ckpt, tmp_path / "c.pt")).int8_onnx is None


def test_cli_embed_needs_int8_and_a_local_checkpoint(tmp_path, capsys):
    ckpt = str(resolve_trained("pcam-patch-cnn"))
    assert main(["export", ckpt, "--onnx", str(tmp_path / "m.onnx"), "--embed"]) == 2
    assert "add --int8" in capsys.readouterr().err
    assert main(["export", "https://example.org/best.pt", "--onnx", str(tmp_path / "m.onnx"),
                 "--int8", "--embed"]) == 2
    assert "download it first" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_embed_stores_the_int8_model_that_passed_in_the_checkpoint(patches, cache,
                                                                        tmp_path, capsys):
    copy = tmp_path / "copy.pt"
    copy.write_bytes(resolve_trained("pcam-patch-cnn").read_bytes())
    assert main(["export", str(copy), "--onnx", str(tmp_path / "m.onnx"), "--int8", "--embed",
                 "--calibration", str(patches), "--gate", str(patches), "--quiet"]) == 0
    assert f"it is stored in {copy} too" in capsys.readouterr().out
    assert load_checkpoint(copy).int8_onnx == (tmp_path / "m.onnx").read_bytes()


def test_an_int8_model_the_cache_cannot_take_leaves_float32_running(tmp_path, monkeypatch):
    import breast_cancer_detection.files as files_module

    real = files_module.atomic_write

    def refuse_int8(path, write):
        if str(path).endswith(".int8.onnx"):
            raise PermissionError(13, "Permission denied")
        return real(path, write)

    monkeypatch.setattr(files_module, "atomic_write", refuse_int8)
    torch_model = Predictor.from_pretrained("pcam-patch-cnn", device="cpu", progress=False)
    with pytest.warns(UserWarning, match="could not be written to the cache.*Permission denied"):
        got = torch_model.on_backend("auto", cache_dir=tmp_path)
    assert got.backend_note == "ONNX Runtime (CPU)"


def test_float32_is_refused_for_an_int8_onnx_file(tmp_path):
    ckpt = load_checkpoint(resolve_trained("pcam-patch-cnn"))
    (tmp_path / "m.int8.onnx").write_bytes(ckpt.int8_onnx)
    int8 = Predictor.from_onnx(tmp_path / "m.int8.onnx")
    assert int8.on_backend("auto") is int8 and int8.on_backend("onnx") is int8
    with pytest.raises(UserError, match="int8 ONNX file: float32 needs the checkpoint"):
        int8.on_backend("float32")

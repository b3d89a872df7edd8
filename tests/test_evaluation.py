"""`bcd evaluate` and `bcd cv` end to end on the fake data sets: files, threshold, leakage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from breast_cancer_detection.checkpoint import load_checkpoint
from breast_cancer_detection.cli import main
from breast_cancer_detection.data.splits import load_split
from breast_cancer_detection.evaluation import LEAKAGE_EXIT_CODE, PREDICTION_COLUMNS
from breast_cancer_detection.metrics import image_metrics, patient_recognition_rate

FAST = ["--bootstrap", "40", "--quiet", "--device", "cpu"]


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    """A private copy of the trained run (evaluation writes the threshold into best.pt)."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def _evaluate(*args) -> int:
    return main(["evaluate", *map(str, args), *FAST])


def _ci_pairs(ci: dict):
    for section, values in ci.items():
        for key, pair in values.items():
            yield section, key, pair


@pytest.mark.slow
def test_evaluate_writes_every_file_and_stores_the_threshold(run, fake_breakhis, tmp_path):
    out = tmp_path / "report"
    assert load_checkpoint(run / "best.pt").threshold is None
    assert _evaluate(run / "best.pt", "--data", fake_breakhis, "--out", out) == 0
    for name in ("metrics.json", "predictions.csv", "report.md", "roc.png", "pr.png",
                 "confusion.png", "reliability.png", "per_magnification.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            im.load()
            assert im.format == "PNG" and 400 <= im.width <= 2000 and 300 <= im.height <= 1500

    m = json.loads((out / "metrics.json").read_text())
    split = load_split(run / "split.csv")
    test = split[split["split"] == "test"]
    assert m["subset"] == "test" and m["counts"]["images"] == len(test)
    assert m["counts"]["patients"] == test["patient"].nunique()
    assert m["same_split_as_training"] is True and m["leakage"] == []
    assert m["bootstrap"]["unit"] == "patient" and m["bootstrap"]["n"] == 40
    pairs = list(_ci_pairs(m["ci"]))
    assert {("image", "accuracy"), ("patient", "recognition_rate"), ("calibration", "ece")} <= {
        (s, k) for s, k, _ in pairs}
    for section, key, (low, high) in pairs:
        if low is not None:
            assert low <= m[section][key] + 1e-9 and m[section][key] <= high + 1e-9, (section, key)
    assert set(m["by_magnification"]) == set(test["magnification"])

    # The threshold was chosen on val, stored in the checkpoint, and used for the predictions.
    info = m["threshold"]
    assert info["chosen_on"] == "val" and info["method"] == "youden"
    assert info["val_images"] == int((split["split"] == "val").sum())
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt.threshold == pytest.approx(info["value"])
    assert {"method", "value", "chosen_on", "val_images"} <= set(ckpt.threshold_info)
    assert ckpt.threshold_info["chosen_on"] == "val"

    preds = pd.read_csv(out / "predictions.csv", dtype={"patient": str})
    assert list(preds.columns) == PREDICTION_COLUMNS
    assert sorted(preds["path"]) == sorted(test["path"])
    assert (preds["prediction"] == preds["probability"].ge(info["value"]).map(
        {True: "malignant", False: "benign"})).all()
    y = (preds["label"] == "malignant").astype(int)
    assert m["image"]["accuracy"] == pytest.approx(
        image_metrics(y, preds["probability"], info["value"])["accuracy"])
    assert m["patient"]["recognition_rate"] == pytest.approx(patient_recognition_rate(
        y, preds["probability"] >= info["value"], preds["patient"]))

    report = (out / "report.md").read_text().splitlines()
    assert report[0].startswith("# Evaluation") and "test subset" in report[0]
    text = "\n".join(report)
    assert "patient-disjoint" in text and "Youden" in text
    assert f"by this evaluation; stored in `{run / 'best.pt'}`" in text
    for png in ("roc.png", "pr.png", "confusion.png", "reliability.png", "per_magnification.png"):
        assert f"]({png})" in text
    assert "| test (evaluated) |" in text and "```yaml" in text and "model: tiny" in text


@pytest.mark.slow
def test_leakage_guard_fires_and_allow_leakage_overrides(run, fake_breakhis, tmp_path):
    split = load_split(run / "split.csv")
    leaked = sorted(set(split.loc[split["split"] == "train", "patient"]))[0]
    split.loc[split["patient"] == leaked, "split"] = "test"  # still one subset per patient
    bad = tmp_path / "leaky.csv"
    split.to_csv(bad, index=False)

    out = tmp_path / "leak"
    args = [run / "best.pt", "--data", fake_breakhis, "--split", bad, "--out", out]
    assert _evaluate(*args) == LEAKAGE_EXIT_CODE
    first = (out / "report.md").read_text().splitlines()[0]
    assert first.startswith("**LEAKAGE:") and leaked in first and "1 of the" in first
    m = json.loads((out / "metrics.json").read_text())
    assert m["leakage"] and m["protocol"].startswith("LEAKED")

    assert _evaluate(*args, "--allow-leakage") == 0
    first = (out / "report.md").read_text().splitlines()[0]
    assert first.startswith("**LEAKAGE:") and "--allow-leakage was given" in first


@pytest.mark.slow
def test_a_validation_subset_that_leaks_is_caught(run, fake_breakhis, tmp_path, capsys):
    split = load_split(run / "split.csv")
    ckpt_val = load_checkpoint(run / "best.pt").split_patients["val"]
    # A training patient in val: its threshold is used, with the caveat, but NOT stored.
    leaked = sorted(set(split.loc[split["split"] == "train", "patient"]))[0]
    moved = split.copy()
    moved.loc[moved["patient"] == leaked, "split"] = "val"
    moved.to_csv(tmp_path / "val_leak.csv", index=False)
    out = tmp_path / "val_leak"
    assert _evaluate(run / "best.pt", "--data", fake_breakhis, "--split",
                     tmp_path / "val_leak.csv", "--out", out) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["leakage"] == [] and m["threshold"]["chosen_on"] == "val"
    caveat = next(c for c in m["caveats"] if "NOT stored in the checkpoint" in c)
    assert leaked in caveat and caveat in (out / "report.md").read_text()
    assert load_checkpoint(run / "best.pt").threshold is None

    # A validation patient in test: the numbers are leaked (exit 3).
    moved = split.copy()
    moved.loc[moved["patient"] == sorted(ckpt_val)[0], "split"] = "test"
    moved.to_csv(tmp_path / "test_leak.csv", index=False)
    capsys.readouterr()
    assert _evaluate(run / "best.pt", "--data", fake_breakhis, "--split",
                     tmp_path / "test_leak.csv", "--out", tmp_path / "test_leak") == (
        LEAKAGE_EXIT_CODE)
    assert "validation subset, which picked its best epoch" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluating_a_folder_without_split_flags_every_training_patient(run, fake_breakhis,
                                                                         tmp_path, capsys):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(run / "best.pt", lone / "model.pt")  # no split.csv next to it
    out = tmp_path / "all"
    assert _evaluate(lone / "model.pt", "--data", fake_breakhis, "--out", out) == (
        LEAKAGE_EXIT_CODE)
    m = json.loads((out / "metrics.json").read_text())
    assert m["subset"] == "all" and any("EVERY image" in n for n in m["notes"])
    n_train = len(load_checkpoint(run / "best.pt").split_patients["train"])
    assert f"{n_train} of the 11 evaluated patients" in m["leakage"][0]
    assert "LEAKAGE" in capsys.readouterr().err


@pytest.mark.slow
def test_without_val_or_stored_threshold_05_is_used_loudly(run, fake_breakhis, tmp_path):
    split = load_split(run / "split.csv")
    split.loc[split["split"] == "val", "split"] = "train"
    no_val = tmp_path / "no_val.csv"
    split.to_csv(no_val, index=False)
    out = tmp_path / "r"
    assert _evaluate(run / "best.pt", "--data", fake_breakhis, "--split", no_val, "--out",
                     out) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["threshold"]["value"] == 0.5 and m["threshold"]["chosen_on"] is None
    assert any(c.startswith("NO THRESHOLD WAS CHOSEN") for c in m["caveats"])
    assert "NO THRESHOLD WAS CHOSEN" in (out / "report.md").read_text()
    assert load_checkpoint(run / "best.pt").threshold is None  # nothing stored

    # Once a threshold is stored (by evaluating with val), a val-less split uses it.
    assert _evaluate(run / "best.pt", "--data", fake_breakhis, "--out", tmp_path / "v") == 0
    stored = load_checkpoint(run / "best.pt").threshold
    assert _evaluate(run / "best.pt", "--data", fake_breakhis, "--split", no_val, "--out",
                     out) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["threshold"]["value"] == pytest.approx(stored) and stored != 0.5
    assert m["threshold"]["source"] == "stored in the checkpoint"
    assert "by an earlier evaluation; read from the checkpoint" in (out / "report.md").read_text()
    assert not any("NO THRESHOLD" in c for c in m["caveats"])


@pytest.mark.slow
def test_target_sensitivity_and_val_subset_caveat(run, fake_breakhis, tmp_path):
    out = tmp_path / "val"
    assert _evaluate(run / "best.pt", "--data", fake_breakhis, "--subset", "val",
                     "--target-sensitivity", "1.0", "--out", out) == 0
    m = json.loads((out / "metrics.json").read_text())
    info = m["threshold"]
    assert info["method"] == "target_sensitivity" and info["target_sensitivity"] == 1.0
    assert info["val_sensitivity"] == 1.0 and m["image"]["sensitivity"] == 1.0
    assert m["leakage"] == []  # val on val is a caveat, not leakage
    assert "chosen on the same subset" in m["caveats"][0]
    assert "chosen on the same subset" in (out / "report.md").read_text()
    assert load_checkpoint(run / "best.pt").threshold_info["method"] == "target_sensitivity"


@pytest.mark.slow
def test_data_without_patient_ids_bootstraps_images(run, fake_imagefolder, tmp_path, capsys):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(run / "best.pt", lone / "model.pt")
    out = tmp_path / "pcam"
    assert _evaluate(lone / "model.pt", "--data", fake_imagefolder, "--subset", "val",
                     "--out", out) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["bootstrap"]["unit"] == "image" and m["bootstrap"]["units"] == 16
    assert m["patient"] == {"note": "no patient ids"} and m["counts"]["patients"] is None
    assert m["protocol"].startswith("image-level")
    assert not (out / "per_magnification.png").exists() and m["by_magnification"] == {}
    text = (out / "report.md").read_text()
    assert "no patient ids" in text and "resamples images" in text
    low, high = m["ci"]["image"]["accuracy"]
    assert low <= m["image"]["accuracy"] <= high

    assert _evaluate(lone / "model.pt", "--data", fake_imagefolder, "--out", out) == 2
    err = capsys.readouterr().err
    assert "no 'test' subset" in err and "train, val" in err


@pytest.mark.slow
def test_without_patient_ids_leakage_is_caught_by_image_path(run, fake_breakhis, tmp_path):
    split = load_split(run / "split.csv").assign(patient="")  # the split hash is unchanged
    split.to_csv(run / "split.csv", index=False)
    out = tmp_path / "train"
    assert _evaluate(run / "best.pt", "--data", fake_breakhis, "--subset", "train", "--out",
                     out) == LEAKAGE_EXIT_CODE
    m = json.loads((out / "metrics.json").read_text())
    n = int((split["split"] == "train").sum())
    # By image path; and by the patient ids the BreakHis file names still carry.
    assert any(s.startswith(f"{n} of the {n} evaluated images were in the checkpoint's "
                            "training subset") for s in m["leakage"])
    assert any("evaluated patients were in the checkpoint's training subset" in s
               for s in m["leakage"])
    assert _evaluate(run / "best.pt", "--data", fake_breakhis, "--out", out) == 0


@pytest.mark.slow
def test_unreadable_images_are_left_out_and_listed(run, fake_breakhis, tmp_path):
    data = Path(shutil.copytree(fake_breakhis, tmp_path / "data"))
    split = load_split(run / "split.csv")
    broken = split.loc[split["split"] == "test", "path"].iloc[0]
    (data / broken).write_bytes(b"")
    out = tmp_path / "r"
    assert _evaluate(run / "best.pt", "--data", data, "--out", out) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["counts"]["unreadable"] == [broken]
    assert m["counts"]["images"] == int((split["split"] == "test").sum()) - 1
    assert any("could not be read" in c and broken in c for c in m["caveats"])
    assert broken not in set(pd.read_csv(out / "predictions.csv")["path"])


def test_evaluate_names_a_missing_data_folder(run, tmp_path, capsys):
    assert _evaluate(run / "best.pt", "--data", tmp_path / "nowhere") == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "--data" in err


@pytest.mark.slow
def test_cv_runs_every_fold_and_summarises(fake_breakhis, tmp_path):
    out = tmp_path / "cv"
    assert main(["cv", "--data", str(fake_breakhis), "--folds", "3", "--preset", "cpu-smoke",
                 "--size", "32", "--batch-size", "16", "--bootstrap", "20", "--out", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    for name in ("folds.csv", "cv_summary.csv", "cv_summary.json", "cv_folds.csv", "report.md"):
        assert (out / name).is_file(), name
    tested = []
    accs = []
    for k in range(3):
        m = json.loads((out / f"fold-{k}" / "metrics.json").read_text())
        assert m["leakage"] == [] and m["threshold"]["chosen_on"] == "val"
        assert (out / "runs" / f"fold-{k}" / "best.pt").is_file()
        preds = pd.read_csv(out / f"fold-{k}" / "predictions.csv", dtype={"patient": str})
        tested.append(set(preds["patient"]))
        accs.append(m["image"]["accuracy"])
    assert not (tested[0] & tested[1] or tested[0] & tested[2] or tested[1] & tested[2])
    assert len(set().union(*tested)) == 11  # every patient is tested exactly once

    summary = pd.read_csv(out / "cv_summary.csv")
    row = summary[(summary["scope"] == "all") & (summary["metric"] == "image.accuracy")].iloc[0]
    assert row["mean"] == pytest.approx(sum(accs) / 3) and row["folds"] == 3
    assert row["std"] == pytest.approx(pd.Series(accs).std())
    assert {"40X", "400X"} <= set(summary["scope"])
    js = json.loads((out / "cv_summary.json").read_text())
    assert js["overall"]["image.accuracy"]["values"] == pytest.approx(accs)
    assert "40X" in js["by_magnification"] and len(js["per_fold"]) == 3
    text = (out / "report.md").read_text()
    assert "Patient-disjoint 3-fold" in text and "By magnification" in text and "+-" in text
    # Out of fold, pooled: every image once, decided at its own fold's threshold.
    oof = pd.read_csv(out / "oof_predictions.csv", dtype={"patient": str})
    assert len(oof) == sum(js["per_fold"][k]["test_images"] for k in range(3))
    assert oof["path"].is_unique and set(oof["fold"]) == {0, 1, 2}
    for k in range(3):
        assert (oof.loc[oof["fold"] == k, "threshold"] == js["per_fold"][k]["threshold"]).all()
    pooled = js["pooled"]
    right = (oof["probability"] >= oof["threshold"]).astype(int) == oof["target"]
    assert pooled["image_accuracy"]["value"] == pytest.approx(right.mean())
    assert pooled["patients"]["value"] == 11
    low, high = pooled["image_accuracy"]["ci"]
    assert low <= pooled["image_accuracy"]["value"] <= high
    assert "Out-of-fold, pooled" in text and "Patient accuracy" in text


@pytest.mark.slow
def test_cv_under_a_time_budget_runs_again_reusing_its_folds(fake_breakhis, tmp_path, capsys):
    from breast_cancer_detection.config import load_preset

    out = tmp_path / "cv"
    preset = tmp_path / "budget.yaml"  # a preset with a budget, as pcam-cpu has
    preset.write_text(yaml.safe_dump({**load_preset("cpu-smoke"), "epochs": 400,
                                      "time_budget": "4s"}))
    args = ["cv", "--data", str(fake_breakhis), "--folds", "3", "--preset", str(preset),
            "--size", "32", "--batch-size", "16", "--bootstrap", "0", "--out", str(out),
            "--device", "cpu", "--quiet"]
    assert main(args) == 0
    planned = [yaml.safe_load((out / "runs" / f"fold-{k}" / "config.yaml").read_text())["epochs"]
               for k in range(3)]
    assert all(e < 400 for e in planned)  # the budget cut each fold's epochs
    capsys.readouterr()
    assert main(args) == 0  # the same cv again: each fold is finished, with its own epochs
    assert capsys.readouterr().out.count("already trained, reusing") == 3


def test_cv_needs_three_folds(fake_breakhis, tmp_path, capsys):
    assert main(["cv", "--data", str(fake_breakhis), "--folds", "2", "--out",
                 str(tmp_path / "cv")]) == 2
    assert "at least 3 folds" in capsys.readouterr().err


@pytest.mark.slow
def test_another_data_folder_is_external_validation(run, fake_imagefolder, tmp_path):
    # The fake PCam-like folder holds none of the run's images: every one of its 48 images
    # is evaluated, at the checkpoint's stored threshold, with no leakage by path.
    stored = load_checkpoint(run / "best.pt")
    stored.with_threshold(0.42, {"method": "youden", "chosen_on": "val"})
    from breast_cancer_detection.checkpoint import save_checkpoint

    save_checkpoint(stored, run / "best.pt")
    out = tmp_path / "ext"
    assert _evaluate(run / "best.pt", "--data", fake_imagefolder, "--out", out) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["subset"] == "all" and m["counts"]["images"] == 48
    assert m["leakage"] == [] and "external" in m["split"]
    assert m["threshold"]["value"] == pytest.approx(0.42)
    assert any(n.startswith("External validation") for n in m["notes"])


@pytest.mark.slow
def test_a_copy_of_the_runs_data_with_files_missing_is_not_external(run, fake_breakhis,
                                                                      tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(fake_breakhis, root)
    test = load_split(run / "split.csv")
    gone = test[test["split"] == "test"]["path"].iloc[0]
    (root / gone).unlink()
    out = tmp_path / "r"
    assert _evaluate(run / "best.pt", "--data", root, "--out", out) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["subset"] == "test" and gone in m["counts"]["unreadable"]


@pytest.mark.slow
def test_a_registered_model_file_is_never_rewritten(run, fake_breakhis, tmp_path, monkeypatch):
    import hashlib

    registry = tmp_path / "models.yaml"
    registry.write_text(f"models:\n  - name: mine\n    task: t\n    file: {run / 'best.pt'}\n"
                        "    sha256: null\n")
    monkeypatch.setenv("BCD_MODELS", str(registry))
    before = hashlib.sha256((run / "best.pt").read_bytes()).hexdigest()
    assert _evaluate(run / "best.pt", "--data", fake_breakhis, "--out", tmp_path / "r") == 0
    assert hashlib.sha256((run / "best.pt").read_bytes()).hexdigest() == before
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert any("registered trained model" in c for c in m["caveats"])


@pytest.mark.slow
def test_ensemble_tool_averages_the_checkpoints(trained, fake_breakhis, tmp_path):
    import subprocess
    import sys

    from breast_cancer_detection.data.breakhis import build_index
    from breast_cancer_detection.inference import Predictor
    from breast_cancer_detection.metrics import roc_auc

    other = tmp_path / "other.pt"
    shutil.copyfile(trained, other)
    tool = Path(__file__).resolve().parents[1] / "tools" / "ensemble_auc.py"
    run = subprocess.run([sys.executable, str(tool), str(fake_breakhis), str(trained),
                          str(other), "--bootstrap", "50"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    index = build_index(fake_breakhis)
    y = index["label"].eq("malignant").astype(int)
    p = [o.p_malignant for o in Predictor.from_checkpoint(trained, device="cpu").predict(
        [fake_breakhis / q for q in index["path"]])]
    alone = round(roc_auc(y, p), 4)
    assert [line["roc_auc"] for line in lines[:2]] == [alone, alone]
    # Two copies of one model: their average is that model.
    assert lines[-1]["ensemble_of"] == 2 and lines[-1]["roc_auc"] == alone
    assert lines[-1]["roc_auc_95ci"][0] <= alone <= lines[-1]["roc_auc_95ci"][1]


def _split_without(run: Path, tmp_path: Path, name: str, rename: dict[str, str]) -> Path:
    """The run's split with subsets renamed (``"drop"`` leaves them out), as a CSV."""
    split = load_split(run / "split.csv")
    split["split"] = split["split"].replace(rename)
    path = tmp_path / f"{name}.csv"
    split[split["split"] != "drop"].to_csv(path, index=False)
    return path


@pytest.mark.slow
def test_a_stored_threshold_says_where_it_came_from_when_reused(run, fake_breakhis, tmp_path):
    ckpt = run / "best.pt"
    # A split whose val is the run's test patients chooses and stores a threshold ...
    on_test = _split_without(run, tmp_path, "on_test", {"val": "drop", "test": "val"})
    assert _evaluate(ckpt, "--data", fake_breakhis, "--split", on_test, "--subset", "val",
                     "--tta", "--out", tmp_path / "a") == 0
    info = load_checkpoint(ckpt).threshold_info
    assert info["tta"] is True and info["val_patient_ids"]
    test_patients = set(load_split(run / "split.csv").query("split == 'test'")["patient"])
    assert set(info["val_patient_ids"]) == test_patients
    # ... which a val-less evaluation of those very patients, on one view, then reuses: said.
    no_val = _split_without(run, tmp_path, "no_val", {"val": "drop"})
    assert _evaluate(ckpt, "--data", fake_breakhis, "--split", no_val, "--out",
                     tmp_path / "b") == 0
    caveats = json.loads((tmp_path / "b" / "metrics.json").read_text())["caveats"]
    assert any("chosen on 8-view TTA probabilities and is applied here to one-view" in c
               for c in caveats)
    assert any(f"holds {len(test_patients)} of the evaluated patients" in c for c in caveats)


@pytest.mark.slow
def test_no_store_threshold_leaves_the_checkpoint_as_it_is(run, fake_breakhis, tmp_path):
    before = (run / "best.pt").read_bytes()
    assert _evaluate(run / "best.pt", "--data", fake_breakhis, "--no-store-threshold",
                     "--out", tmp_path / "r") == 0
    assert (run / "best.pt").read_bytes() == before
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["threshold"]["source"] == "chosen on val now"

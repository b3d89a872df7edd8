"""Training end to end on the fake BreakHis tree: files, resume, atomic saves, bad input, DDP."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from breast_cancer_detection import checkpoint, engine
from breast_cancer_detection.checkpoint import amp_dtype, load_checkpoint
from breast_cancer_detection.cli import main
from breast_cancer_detection.config import ConfigError, TrainConfig, list_presets, load_preset
from breast_cancer_detection.engine import (
    TrainingError,
    budget,
    epochs,
    fit,
    fitting,
    processes,
    resume,
    setup,
)
from breast_cancer_detection.errors import UserError
from breast_cancer_detection.models import create_model


def _cfg(data: Path, tmp_path: Path, **kw) -> TrainConfig:
    settings = {**load_preset("cpu-smoke"), "data": str(data), "runs_dir": str(tmp_path / "runs"),
                "name": "r", "val": 0.25, "test": 0.2, "size": 32, "resize": 40}
    settings.update(kw)
    return TrainConfig.from_dict(settings)


BF16_LOSS_ATOL = 0.01
"""How far bf16 autocast may move cpu-smoke's validation loss (about 0.58 after its epoch) from
float32's: bf16 keeps 8 significant bits, 0.4% a value; 0.0003 apart is typical."""


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict


def test_one_epoch_writes_every_file(fake_breakhis, tmp_path):
    result = fit(_cfg(fake_breakhis, tmp_path), progress=False)
    run = result.run_dir
    for name in ("config.yaml", "split.csv", "metrics.csv", "last.pt", "best.pt"):
        assert (run / name).is_file(), name
    assert not list(run.glob(".*tmp*"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"] == "tiny" and cfg["data"] == str(fake_breakhis)
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["epoch"]) == [1]
    assert {"train_loss", "val_loss", "val_acc", "val_auc", "lr"} <= set(metrics.columns)
    split = pd.read_csv(run / "split.csv", dtype=str)
    assert set(split["split"]) == {"train", "val", "test"}
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt.arch == "tiny" and ckpt.classes == ["benign", "malignant"]
    assert ckpt.preprocessing["size"] == 32
    assert ckpt.config["epochs"] == 1 and len(ckpt.split_hash) == 16
    assert set(ckpt.split_patients) == {"train", "val", "test"}
    assert "torch" in ckpt.versions and ckpt.resume is None
    assert load_checkpoint(run / "last.pt").resume is not None
    assert ckpt.metrics["val_auc"] == pytest.approx(metrics["val_auc"].iloc[0])
    assert result.best_epoch == 1


def _interrupt_in_epoch(monkeypatch, epoch: int, after_batches: int):
    """Makes the next fit raise KeyboardInterrupt after some real batches of one epoch."""
    real = epochs.train_one_epoch
    seen = {"epochs": 0}

    def wrapped(model, loader, *args, **kwargs):
        seen["epochs"] += 1
        if seen["epochs"] != epoch:
            return real(model, loader, *args, **kwargs)

        def cut():
            for k, batch in enumerate(loader):
                if k == after_batches:
                    raise KeyboardInterrupt
                yield batch

        return real(model, cut(), *args, **kwargs)

    monkeypatch.setattr(epochs, "train_one_epoch", wrapped)
    return real


class _DropoutTiny(torch.nn.Module):
    """The tiny network with dropout: its draws come from the same generator as the
    augmentation's, so a resumed epoch must go on from the saved generator state."""

    def __init__(self, num_classes: int):
        super().__init__()
        from breast_cancer_detection.models import SmallCNN

        self.net = SmallCNN(num_classes, width=8, depth=2)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        f = torch.flatten(self.net.pool(self.net.features(x)), 1)
        return self.net.classifier(self.drop(f))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "tiny_dropout"])
@pytest.mark.parametrize("after_batches", [0, 2])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(
        fake_breakhis, tmp_path, monkeypatch, capsys, after_batches, model):
    from breast_cancer_detection import models

    monkeypatch.setitem(models._LOCAL, "tiny_dropout", _DropoutTiny)
    straight = fit(_cfg(fake_breakhis, tmp_path / "a", epochs=3, model=model), progress=False)
    real = _interrupt_in_epoch(monkeypatch, epoch=2, after_batches=after_batches)
    run = tmp_path / "b" / "runs" / "r"
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(fake_breakhis, tmp_path / "b", epochs=3, model=model), progress=False)
    assert f"bcd train --resume {run}" in capsys.readouterr().err
    ckpt = load_checkpoint(run / "last.pt")
    assert (ckpt.epoch, ckpt.resume.step) == (1, after_batches)
    monkeypatch.setattr(epochs, "train_one_epoch", real)
    resumed = resume(run, progress=False)
    a, b = _weights(straight.run_dir / "last.pt"), _weights(resumed.run_dir / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    straight_rows, resumed_rows = (pd.read_csv(r / "metrics.csv")
                                   for r in (straight.run_dir, run))
    assert list(resumed_rows["epoch"]) == [1, 2, 3]
    for column in ("train_loss", "val_loss", "val_auc"):
        np.testing.assert_allclose(resumed_rows[column], straight_rows[column], rtol=0,
                                   atol=1e-6, err_msg=column)
    # A finished run asked to resume with no more epochs says what to do.
    with pytest.raises(Exception, match="larger --epochs"):
        resume(run, progress=False)
    # ... and one given more epochs trains on.
    more = resume(run, {"epochs": 4}, progress=False)
    assert load_checkpoint(more.run_dir / "last.pt").epoch == 4


@pytest.mark.slow
def test_an_epoch_resumed_part_way_goes_on_from_the_saved_generator(fake_breakhis, tmp_path,
                                                                    monkeypatch):
    """The fast loop's resume check: dropout draws after the cut come from the generator
    state saved in last.pt, so the weights match an uninterrupted epoch exactly."""
    from breast_cancer_detection import models

    monkeypatch.setitem(models._LOCAL, "tiny_dropout", _DropoutTiny)
    straight = fit(_cfg(fake_breakhis, tmp_path / "a", model="tiny_dropout"), progress=False)
    real = _interrupt_in_epoch(monkeypatch, epoch=1, after_batches=2)
    run = tmp_path / "b" / "runs" / "r"
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(fake_breakhis, tmp_path / "b", model="tiny_dropout"), progress=False)
    assert load_checkpoint(run / "last.pt").resume.step == 2
    monkeypatch.setattr(epochs, "train_one_epoch", real)
    torch.manual_seed(12345)  # the process's generator is elsewhere now, as after a restart
    resumed = resume(run, progress=False)
    a, b = _weights(straight.run_dir / "last.pt"), _weights(resumed.run_dir / "last.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_checkpoint_trained_on_gpu_loads_on_cpu(fake_breakhis, tmp_path):
    result = fit(_cfg(fake_breakhis, tmp_path), progress=False)
    ckpt = load_checkpoint(result.run_dir / "best.pt", map_location="cpu")
    assert all(t.device.type == "cpu" for t in ckpt.state_dict.values())


def _copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
def test_bad_images_are_skipped_then_fail_past_the_limit(fake_breakhis, tmp_path, capsys):
    root = _copy_tree(fake_breakhis, tmp_path / "data")
    victim = sorted(root.rglob("*DC-14-2523-40-00*.png"))[0]
    victim.write_bytes(b"garbage")
    cfg = _cfg(root, tmp_path, val=0.0, test=0.0, max_bad_fraction=0.1)
    result = fit(cfg, progress=False)
    bad = list(result.bad_images)
    assert bad == [victim.relative_to(root).as_posix()]
    assert victim.name in capsys.readouterr().out
    with pytest.raises(TrainingError, match="unreadable.*--verify"):
        fit(_cfg(root, tmp_path, val=0.0, test=0.0, max_bad_fraction=0.0, name="r2"),
            progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(fake_breakhis, tmp_path, monkeypatch):
    cfg = _cfg(fake_breakhis, tmp_path, epochs=2)
    real_forward = torch.nn.CrossEntropyLoss.forward
    state = {"epoch2": False}
    real_epoch = epochs.train_one_epoch

    def epoch(*a, **k):
        if k["state"].step == 0 and state.get("done1"):
            state["epoch2"] = True
        out = real_epoch(*a, **k)
        state["done1"] = True
        return out

    def forward(self, input, target):
        loss = real_forward(self, input, target)
        return loss * float("nan") if state["epoch2"] and self.training else loss

    monkeypatch.setattr(epochs, "train_one_epoch", epoch)
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", forward)
    with pytest.raises(TrainingError, match="loss became nan"):
        fit(cfg, progress=False)
    ckpt = load_checkpoint(tmp_path / "runs" / "r" / "last.pt")
    assert ckpt.epoch == 1
    assert all(torch.isfinite(v).all() for v in ckpt.state_dict.values() if v.is_floating_point())


def test_config_rejects_bad_combinations():
    with pytest.raises(ConfigError, match="sum under 1"):
        TrainConfig(val=0.6, test=0.5)
    with pytest.raises(ConfigError, match="--weights PATH"):
        TrainConfig(pretrained=False, freeze_backbone=True)
    with pytest.raises(ConfigError, match="--pretrained or --weights PATH"):
        TrainConfig(pretrained=False, freeze_early=4)
    with pytest.raises(ConfigError, match="freeze_early=-1"):
        TrainConfig(freeze_early=-1)
    with pytest.raises(ConfigError, match="unknown TrainConfig setting"):
        TrainConfig.from_dict({"epocs": 3})
    with pytest.raises(ConfigError, match="resize"):
        TrainConfig(size=224, resize=200)


@pytest.mark.parametrize("name", list_presets())
def test_every_bundled_preset_is_a_valid_config(name):
    assert TrainConfig.from_dict(load_preset(name))


def test_a_preset_starts_from_its_base_and_replaces_its_settings(tmp_path):
    own = {"model": "mobilenet_v2", "pretrained": True, "lr": 0.001, "freeze_early": 4}
    assert load_preset("pcam-mobilenet-cpu") == {**load_preset("pcam-cpu"), **own}
    (tmp_path / "a.yaml").write_text("base: b.yaml\nlr: 0.1\n")
    (tmp_path / "b.yaml").write_text("base: cpu-smoke\nepochs: 2\nlr: 0.5\n")
    assert load_preset(str(tmp_path / "a.yaml")) == {**load_preset("cpu-smoke"), "epochs": 2,
                                                     "lr": 0.1}
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="lead back"):
        load_preset(str(tmp_path / "a.yaml"))
    (tmp_path / "b.yaml").write_text("base: [cpu-smoke]\n")
    with pytest.raises(ConfigError, match="must name one preset"):
        load_preset(str(tmp_path / "a.yaml"))
    (tmp_path / "b.yaml").write_text("base: no-such-preset\n")
    with pytest.raises(ConfigError, match="no preset 'no-such-preset'"):
        load_preset(str(tmp_path / "a.yaml"))


def test_cli_train_with_preset_and_overrides(fake_breakhis, tmp_path, capsys):
    code = main(["train", "--preset", "cpu-smoke", "--data", str(fake_breakhis), "--size", "32",
                 "--resize", "36", "--runs-dir", str(tmp_path), "--name", "cli", "--quiet",
                 "--aug", "rot90=false"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Done. Best epoch 1: validation accuracy" in out and "AUC" in out
    cfg = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())
    assert cfg["size"] == 32 and cfg["model"] == "tiny" and cfg["augment"]["rot90"] is False
    # Starting a new run over an existing one is refused with the resume command.
    assert main(["train", "--preset", "cpu-smoke", "--data", str(fake_breakhis),
                 "--runs-dir", str(tmp_path), "--name", "cli", "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_cli_train_freeze_early_keeps_the_first_blocks_of_the_weights_given(fake_breakhis,
                                                                            tmp_path):
    start = tmp_path / "start.pth"
    torch.save(create_model("mobilenet_v2", num_classes=1000).state_dict(), start)
    assert main(["train", "--preset", "cpu-smoke", "--data", str(fake_breakhis), "--size", "32",
                 "--resize", "36", "--model", "mobilenet_v2", "--weights", str(start),
                 "--freeze-early", "2", "--runs-dir", str(tmp_path), "--name", "f",
                 "--quiet"]) == 0
    trained = load_checkpoint(tmp_path / "f" / "last.pt").state_dict
    given = torch.load(start, weights_only=True)
    assert yaml.safe_load((tmp_path / "f" / "config.yaml").read_text())["freeze_early"] == 2
    assert torch.equal(trained["features.1.conv.0.0.weight"], given["features.1.conv.0.0.weight"])
    assert not torch.equal(trained["features.2.conv.0.0.weight"],
                           given["features.2.conv.0.0.weight"])


def test_amp_settings_per_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # On a CPU ``auto`` follows the hardware check: patch it both ways so the host does not matter.
    monkeypatch.setattr(checkpoint, "cpu_has_native_bf16", lambda: False)
    assert amp_dtype("auto", cpu) is None and amp_dtype("fp16", cpu) is None
    assert amp_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr(checkpoint, "cpu_has_native_bf16", lambda: True)
    assert amp_dtype("auto", cpu) == torch.bfloat16 and amp_dtype("fp16", cpu) is None
    assert amp_dtype("off", cpu) is None
    assert amp_dtype("off", cuda) is None and amp_dtype("fp16", cuda) == torch.float16
    assert amp_dtype("bf16", cuda) == torch.bfloat16


def test_cpu_bf16_training_runs_and_says_so(fake_breakhis, tmp_path, capsys):
    code = main(["train", "--preset", "cpu-smoke", "--data", str(fake_breakhis), "--size", "32",
                 "--resize", "36", "--runs-dir", str(tmp_path), "--name", "bf16", "--quiet",
                 "--amp", "bf16", "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    assert "bfloat16 autocast" in out and "Done. Best epoch" in out
    ckpt = load_checkpoint(tmp_path / "bf16" / "last.pt")
    weights = [v for v in ckpt.state_dict.values() if v.is_floating_point()]
    # Autocast computes in bf16; the weights it trains stay float32.
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights)


def test_imagefolder_presplit_trains(fake_imagefolder, tmp_path):
    from breast_cancer_detection.data.breakhis import build_index
    from breast_cancer_detection.inference import Predictor

    result = fit(_cfg(fake_imagefolder, tmp_path, size=32, resize=None), progress=False)
    split = pd.read_csv(result.run_dir / "split.csv", dtype=str)
    assert split.groupby("split").size().to_dict() == {"train": 32, "val": 16}
    # The validation figures are those of valid/'s 16 images scored by the saved model.
    valid = build_index(fake_imagefolder / "valid")
    assert len(valid) == 16
    scored = Predictor.from_checkpoint(result.run_dir / "best.pt", device="cpu").predict_table(
        fake_imagefolder / "valid", valid, progress=False)
    expected = ((scored["probability"] >= 0.5).astype(int) == scored["target"]).mean()
    assert result.best["val_acc"] == pytest.approx(expected)


@pytest.mark.slow
@pytest.mark.timeout(660)  # two training runs of up to 300 s each
def test_ddp_two_processes_match_one(fake_breakhis, tmp_path):
    # float32 on every CPU: `--amp auto` picks bf16 on AVX512-BF16 machines, whose rounding
    # of batches of 8 and of 2 x 4 differs by more than this test's summation-order tolerance.
    common = ["--preset", "cpu-smoke", "--data", str(fake_breakhis), "--size", "32",
              "--resize", "36", "--balance", "none", "--epochs", "2", "--quiet", "--amp", "off",
              "--aug", "flips=false", "--aug", "rot90=false", "--aug", "crop=false",
              "--runs-dir", str(tmp_path), "--device", "cpu", "--val", "0.25", "--test", "0.2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "breast_cancer_detection.train", *common,
                          "--batch-size", "8", "--name", "one"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29513", "-m", "breast_cancer_detection.train",
                          *common, "--batch-size", "4", "--name", "two"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert "x2" in two.stdout
    a, b = _weights(tmp_path / "one" / "last.pt"), _weights(tmp_path / "two" / "last.pt")
    for k in a:
        # Adam amplifies float summation-order noise to ~1e-5; wrong sharding gives ~1e-2.
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
    ma = pd.read_csv(tmp_path / "one" / "metrics.csv")
    mb = pd.read_csv(tmp_path / "two" / "metrics.csv")
    # Validation metrics are reduced over both ranks: the same images, the same numbers.
    assert ma["val_auc"].tolist() == pytest.approx(mb["val_auc"].tolist(), abs=1e-4)
    assert ma["val_loss"].tolist() == pytest.approx(mb["val_loss"].tolist(), abs=1e-4)


@pytest.mark.slow
def test_training_reads_the_prepared_cache(fake_breakhis, tmp_path, monkeypatch, capsys):
    from breast_cancer_detection.data.breakhis import build_index
    from breast_cancer_detection.data.cache import prepare_cache
    from breast_cancer_detection.errors import UserError

    monkeypatch.chdir(tmp_path)  # the default cache folder is under the working directory
    with pytest.raises(UserError, match="prepared cache"):  # batches need one: a clear refusal
        fit(_cfg(fake_breakhis, tmp_path, name="nocache", batch_augment="on", cache="off"),
            progress=False)
    prepare_cache(fake_breakhis, build_index(fake_breakhis), 40, progress=False, workers=0)
    files = fit(_cfg(fake_breakhis, tmp_path, name="files", cache="off"), progress=False)
    assert "from the cache" not in capsys.readouterr().out
    cached = fit(_cfg(fake_breakhis, tmp_path, name="cached"), progress=False)
    out = capsys.readouterr().out
    assert "Reading decoded images from the cache" in out and "whole batches" not in out
    # Training from resized copies draws other crops, so only the shapes of results compare.
    assert cached.last.keys() == files.last.keys()
    batched = fit(_cfg(fake_breakhis, tmp_path, name="batched", batch_augment="on"),
                  progress=False)
    assert "augmenting whole batches on cpu" in capsys.readouterr().out
    assert batched.last["val_loss"] > 0 and (tmp_path / "runs" / "batched" / "best.pt").is_file()


@pytest.mark.slow
def test_sigterm_saves_last_like_ctrl_c(fake_breakhis, tmp_path, monkeypatch):
    real = epochs.train_one_epoch
    seen = {"n": 0}

    def terminated(*args, **kwargs):
        seen["n"] += 1
        if seen["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(epochs, "train_one_epoch", terminated)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(fake_breakhis, tmp_path, epochs=3), progress=False)
    assert load_checkpoint(tmp_path / "runs" / "r" / "last.pt").epoch == 1
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_and_exits_143(fake_breakhis, tmp_path):
    # What `timeout`, SLURM and systemd do: signal the whole group, DataLoader workers too.
    run = tmp_path / "runs" / "r"
    cmd = [sys.executable, "-m", "breast_cancer_detection.train", "--preset", "cpu-smoke",
           "--data", str(fake_breakhis), "--runs-dir", str(tmp_path / "runs"), "--name", "r",
           "--size", "32", "--resize", "40", "--epochs", "500", "--workers", "2", "--quiet",
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while not (run / "last.pt").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        time.sleep(1.0)  # into a later epoch, while its loader's workers run
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"still running 120 s after SIGTERM; its stderr:\n{err}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "killed by signal" not in err, err
    assert f"Resume with: bcd train --resume {run}" in err
    saved = load_checkpoint(run / "last.pt")
    assert saved.resume is not None and saved.epoch >= 1
    # best.pt holds the best epoch that last.pt names.
    assert load_checkpoint(run / "best.pt").epoch == saved.best_epoch
    assert main(["train", "--resume", str(run), "--epochs", str(saved.epoch + 1),
                 "--quiet"]) == 0
    assert load_checkpoint(run / "last.pt").epoch == saved.epoch + 1


class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return torch.tensor([i])


def _slow_start(worker_id):
    time.sleep(0.5)  # a worker still starting up when the group's SIGTERM arrives
    processes.ignore_sigterm(worker_id)


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_a_sigterm_while_workers_start_does_not_kill_them():
    loader = processes.Loader(_Numbers(), batch_size=8, num_workers=2, worker_init_fn=_slow_start)
    it = iter(loader)
    for w in it._workers:
        os.kill(w.pid, signal.SIGTERM)  # before _ignore_sigterm ran in them
    assert torch.cat(list(it)).flatten().tolist() == list(range(64))
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == set()  # unblocked again here


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork start method")
@pytest.mark.slow
def test_a_run_ending_on_an_exception_does_not_wait_for_its_workers(tmp_path):
    # multiprocessing's exit hook terminate()s live workers and waits: ours ignore SIGTERM.
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent("""
        import torch
        from breast_cancer_detection import checkpoint
        from breast_cancer_detection.engine import processes

        class Numbers(torch.utils.data.Dataset):
            def __len__(self):
                return 10_000

            def __getitem__(self, i):
                return torch.tensor([i])

        it = iter(processes.Loader(Numbers(), batch_size=1, num_workers=2,
                                   worker_init_fn=processes.ignore_sigterm))
        next(it)
        raise RuntimeError("boom")
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "RuntimeError: boom" in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- the CPU recipe


@pytest.mark.slow
def test_training_stores_the_threshold_chosen_on_val(fake_breakhis, tmp_path, capsys):
    result = fit(_cfg(fake_breakhis, tmp_path, epochs=2, tta=True), progress=False)
    best = load_checkpoint(result.run_dir / "best.pt")
    assert best.threshold is not None and 0 < best.threshold < 1
    assert best.threshold_info["chosen_on"] == "val" and best.threshold_info["method"] == "youden"
    assert best.threshold_info["val_images"] == 12
    assert {"val_auc_tta", "val_acc_tta"} <= set(best.metrics)
    out = capsys.readouterr().out
    assert "stored in best.pt" in out and "with 8-view TTA AUC" in out


@pytest.mark.slow
def test_a_time_budget_sizes_the_epochs(fake_breakhis, tmp_path, capsys, monkeypatch):
    # 1 s per step and 2 s of validation: 60 s leave room for a few epochs of 4 steps, not 50.
    monkeypatch.setattr(budget, "time_steps", lambda run, steps, **kw: (1.0, 2.0))
    cfg = _cfg(fake_breakhis, tmp_path, epochs=50, time_budget="60s", batch_size=8)
    result = fit(cfg, progress=False)
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    steps = 4  # 32 training images, batch 8
    expected = int((0.95 * 60 - 2.0) // (steps * 1.0 + 2.0))  # the final pass is one validation
    out = capsys.readouterr().out
    planned = int(re.search(r"-> (\d+) epoch\(s\) \(at most 50\)", out).group(1))
    assert planned in (expected - 1, expected) and saved["time_budget"] == "60s"
    # The real epochs take far less than the 6 s the mocked timing said: the schedule grows
    # (in the run's first half only), up to the 50 epochs it was given.
    assert "of the time the first steps predicted" in out and saved["epochs"] > planned
    assert load_checkpoint(result.run_dir / "last.pt").epoch == saved["epochs"]
    assert f"the 60s time budget allowed {saved['epochs']} epochs" in out


def test_a_gpu_recipe_on_a_cpu_says_how_long_it_would_take(fake_breakhis, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.setattr(budget, "time_steps", lambda run, steps, **kw: (2.0, 10.0))
    fit(_cfg(fake_breakhis, tmp_path, epochs=1, expects_gpu=True), progress=False)
    out = capsys.readouterr().out
    assert "expects a CUDA GPU and there is none" in out and "--time-budget" in out


def test_timing_the_first_steps_leaves_the_run_untouched(fake_breakhis, tmp_path):
    from breast_cancer_detection.engine import build_run, time_steps

    cfg = _cfg(fake_breakhis, tmp_path, epochs=1)
    run = build_run(cfg, tmp_path / "runs" / "t", None, progress=False)
    before = {k: v.clone() for k, v in run.raw_model.state_dict().items()}
    rng = torch.get_rng_state()
    step_s, val_s = time_steps(run, steps=2)
    assert step_s > 0 and val_s > 0
    assert all(torch.equal(before[k], v) for k, v in run.raw_model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_the_first_steps_are_timed_even_when_the_data_is_smaller_than_a_batch(fake_breakhis,
                                                                            tmp_path):
    from breast_cancer_detection.engine import build_run, time_steps

    run = build_run(_cfg(fake_breakhis, tmp_path, batch_size=64), tmp_path / "runs" / "t",
                    None, progress=False)
    assert len(run.train_ds) < 64
    step_s, val_s = time_steps(run, steps=12)
    assert step_s > 0 and val_s > 0


@pytest.mark.slow
def test_batch_augmentation_builds_the_missing_cache(fake_breakhis, tmp_path, capsys,
                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default cache folder is under the working directory
    root = tmp_path / "data"
    shutil.copytree(fake_breakhis, root)
    result = fit(_cfg(root, tmp_path, batch_augment="on"), progress=False)
    out = capsys.readouterr().out
    assert "building it now" in out and "augmenting whole batches" in out
    assert (result.run_dir / "best.pt").is_file()
    # A stale cache is rebuilt the same way: the log says why, and no warning tells the user
    # to run `bcd prepare` for what the run does itself.
    import warnings

    image = next(root.rglob("*.png"))
    os.utime(image, (image.stat().st_atime, image.stat().st_mtime + 100))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(_cfg(root, tmp_path, batch_augment="on", name="again"), progress=False)
    out = capsys.readouterr().out
    assert "was modified after it was cached): building it now" in out, out
    assert "run `bcd prepare" not in out
    assert not [w for w in caught if "image cache" in str(w.message)]


@pytest.mark.slow
def test_weight_averaging_ships_the_average_and_resumes(fake_breakhis, tmp_path):
    cfg = _cfg(fake_breakhis, tmp_path, epochs=2, ema=0.5)
    result = fit(cfg, progress=False)
    last = load_checkpoint(result.run_dir / "last.pt")
    raw = last.resume.model
    assert raw is not None
    differ = [k for k, v in last.state_dict.items() if v.is_floating_point()
              and not torch.equal(v, raw[k])]
    assert differ, "the stored weights must be the average, not the trained weights"
    more = resume(result.run_dir, {"epochs": 3}, progress=False)
    assert load_checkpoint(more.run_dir / "last.pt").epoch == 3


def test_the_cpu_class_can_be_forced_for_tests_and_ci(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(checkpoint.CPU_BF16_ENV, "1")
    assert checkpoint.cpu_has_native_bf16() and amp_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setenv(checkpoint.CPU_BF16_ENV, "0")
    assert not checkpoint.cpu_has_native_bf16() and amp_dtype("auto", cpu) is None
    assert amp_dtype("bf16", cpu) == torch.bfloat16  # asked for, it is obeyed anyway
    monkeypatch.setenv(checkpoint.CPU_BF16_ENV, "yes")
    with pytest.raises(UserError, match="BCD_CPU_BF16='yes': use 1"):
        checkpoint.cpu_has_native_bf16()
    monkeypatch.delenv(checkpoint.CPU_BF16_ENV)
    assert checkpoint.cpu_has_native_bf16() == bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.parametrize("native", ["0", "1"], ids=["avx2-class", "bf16-class"])
@pytest.mark.slow
def test_amp_auto_trains_on_either_cpu_class_within_its_tolerance(native, fake_breakhis,
                                                                  tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(checkpoint.CPU_BF16_ENV, native)
    auto = fit(_cfg(fake_breakhis, tmp_path / "auto", amp="auto"), progress=False)
    said = capsys.readouterr().out
    exact = fit(_cfg(fake_breakhis, tmp_path / "f32", amp="off"), progress=False)
    a, b = _weights(auto.run_dir / "last.pt"), _weights(exact.run_dir / "last.pt")
    if native == "0":  # float32 both times: the same run, bit for bit
        assert "Precision: float32" in said
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
        assert auto.last["val_loss"] == exact.last["val_loss"]
    else:  # bf16 autocast: the weights stay float32; the loss within bf16's rounding
        assert "Precision: bf16 autocast" in said and "BCD_CPU_BF16=1 decided" in said
        assert all(v.dtype == b[k].dtype and torch.isfinite(v).all() for k, v in a.items())
        assert auto.last["val_loss"] == pytest.approx(exact.last["val_loss"], abs=BF16_LOSS_ATOL)
        assert any(not torch.equal(v, b[k]) for k, v in a.items())  # bf16 really ran


@pytest.mark.slow
def test_the_budget_shortens_the_schedule_when_epochs_run_slow(fake_breakhis, tmp_path, capsys,
                                                               monkeypatch):
    # The first steps claim to be nearly free, so the plan is the 50-epoch maximum...
    monkeypatch.setattr(budget, "time_steps", lambda run, steps, **kw: (0.001, 0.001))
    real = fitting.train_epoch

    def slow(run, state):  # ...but every epoch takes at least 1 s.
        start = time.perf_counter()
        row = real(run, state)
        time.sleep(max(0.0, 1.0 - (time.perf_counter() - start)))
        return {**row, "seconds": time.perf_counter() - start}

    monkeypatch.setattr(fitting, "train_epoch", slow)
    start = time.perf_counter()
    result = fit(_cfg(fake_breakhis, tmp_path, epochs=50, time_budget="15s", batch_size=8),
                 progress=False)
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "-> 50 epoch(s)" in out and "the schedule now ends after" in out, out
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())["epochs"]
    assert 2 <= saved < 50 and load_checkpoint(result.run_dir / "last.pt").epoch == saved
    assert elapsed < 15 + 4  # the budget, plus the final pass it keeps aside
    schedule = load_checkpoint(result.run_dir / "last.pt").resume.scheduler["lr_lambdas"][0]
    assert schedule["total"] == saved * 4  # the cosine ends with the shortened run


@pytest.mark.slow
def test_resuming_with_more_epochs_trains_them_at_a_live_learning_rate(fake_breakhis, tmp_path):
    run = fit(_cfg(fake_breakhis, tmp_path, epochs=2), progress=False).run_dir
    before = _weights(run / "last.pt")
    more = resume(run, {"epochs": 4}, progress=False)
    rows = pd.read_csv(more.run_dir / "metrics.csv")
    assert list(rows["epoch"]) == [1, 2, 3, 4]
    assert rows["lr"].iloc[2] > 0  # the cosine now ends after epoch 4, not 2
    after = _weights(run / "last.pt")
    assert any(not torch.equal(before[k], after[k])
               for k in before if before[k].is_floating_point())


def test_no_threshold_is_stored_when_validation_cannot_choose_one(fake_breakhis, tmp_path,
                                                                  monkeypatch, capsys):
    import breast_cancer_detection.thresholds as thresholds

    def one_class(ckpt, val, *args):
        return 0.5, {"method": "default", "value": 0.5, "chosen_on": None}, ["one class only"]

    monkeypatch.setattr(thresholds, "decide_threshold", one_class)
    result = fit(_cfg(fake_breakhis, tmp_path, epochs=1), progress=False)
    assert load_checkpoint(result.run_dir / "best.pt").threshold is None
    assert "No threshold stored: one class only" in capsys.readouterr().out


@pytest.mark.parametrize("batch_augment", ["on", "off"])
@pytest.mark.slow
def test_early_epochs_train_on_windows_then_whole_images(fake_breakhis, tmp_path, capsys,
                                                         monkeypatch, batch_augment):
    monkeypatch.chdir(tmp_path)  # the default cache folder is under the working directory
    root = tmp_path / "data"
    shutil.copytree(fake_breakhis, root)
    cfg = _cfg(root, tmp_path, epochs=4, size=48, resize=None, early_crop=32,
               early_fraction=0.5, batch_augment=batch_augment, cache="auto")
    assert [cfg.window(e) for e in range(4)] == [32, 32, None, None]
    seen = []  # (training?, input side) of every forward pass of the network
    real = setup.build_model

    def build(cfg, dist_info):
        raw, model = real(cfg, dist_info)
        raw.register_forward_pre_hook(lambda m, args: seen.append((m.training,
                                                                   args[0].shape[-1])))
        return raw, model

    monkeypatch.setattr(setup, "build_model", build)
    result = fit(cfg, progress=False)
    rows = pd.read_csv(result.run_dir / "metrics.csv")
    assert list(rows["train_size"]) == [32, 32, 48, 48]
    trained = [side for training, side in seen if training]
    assert set(trained) == {32, 48} and trained[0] == 32 and trained[-1] == 48
    assert {side for training, side in seen if not training} == {48}  # validation: whole
    out = capsys.readouterr().out
    assert out.count("(32 px windows)") == 2
    assert load_checkpoint(result.run_dir / "best.pt").epoch >= 1


def test_early_window_settings_are_checked():
    with pytest.raises(ConfigError, match="smaller than size=96"):
        TrainConfig(size=96, resize=None, early_crop=96)
    with pytest.raises(ConfigError, match="at least 32"):
        TrainConfig(size=96, resize=None, early_crop=16)
    with pytest.raises(ConfigError, match="early_fraction=1"):
        TrainConfig(early_fraction=1)
    cfg = TrainConfig(size=96, resize=None, early_crop=64, early_fraction=0.6, epochs=10)
    assert cfg.early_epochs == 6 and cfg.window(5) == 64 and cfg.window(6) is None
    assert TrainConfig(epochs=10).early_epochs == 0 and TrainConfig(epochs=10).window(0) is None


def test_the_budget_counts_window_epochs_at_their_own_pace():
    from breast_cancer_detection.engine import epoch_costs, fitting_epochs

    cfg = TrainConfig(size=96, resize=None, early_crop=64, early_fraction=0.5, epochs=40)
    pace = {"whole": 10.0, "window": 5.0}
    assert epoch_costs(cfg, 4, pace) == [5.0, 5.0, 10.0, 10.0]
    # 10 epochs: 5 windowed (25 s) + 5 whole (50 s) = 75 s; 11 would be 6 x 5 + 5 x 10 = 80 s.
    assert fitting_epochs(cfg, 0, 40, 75.0, pace) == 10
    assert fitting_epochs(cfg, 0, 8, 75.0, pace) == 8  # never past the epochs given
    # After 3 epochs, 45 s left: epochs 4..n of an n-epoch plan must fit.
    assert fitting_epochs(cfg, 3, 40, 45.0, pace) == 8  # 1 windowed + 4 whole = 45 s
    assert TrainConfig.from_dict({**cfg.to_dict(), "epochs": 1}).early_epochs == 0
    whole = TrainConfig(size=96, resize=None, epochs=40)
    assert fitting_epochs(whole, 0, 40, 75.0, pace) == 7


def test_the_budget_grows_the_plan_only_with_half_an_epoch_to_spare(monkeypatch):
    import types

    changed = []
    monkeypatch.setattr(budget, "set_epochs",
                        lambda run, epochs, early=None: changed.append(epochs))
    cfg = TrainConfig(size=96, resize=None, epochs=10, time_budget="1000s")
    pace = {"whole": 10.0, "window": 10.0}

    def replan(left: float, done: int = 2, seconds: float = 10.0):
        # The run started so long ago that `left` seconds of the budget (95%, less the final
        # pass) remain.
        run = types.SimpleNamespace(cfg=cfg, pace=pace, most_epochs=40, final_s=0.0,
                                    dist=types.SimpleNamespace(world=1), log=lambda msg: None)
        run.started = time.perf_counter() - (0.95 * 1000 - left)
        changed.clear()
        budget.replan(run, pd.DataFrame(), {"epoch": done, "seconds": seconds,
                                            "train_size": 96})
        return changed[-1] if changed else cfg.epochs

    assert replan(85.0) == 10  # room for the 8 epochs left and half of one more: kept
    assert replan(92.0) == 10  # room for 9.2: growing needs 9 and a half
    assert replan(97.0) == 11  # one more, with half an epoch to spare
    assert replan(65.0) == 8  # too slow: shortened to what fits
    assert replan(65.0, done=6) == 10 and replan(200.0, done=6) == 10  # second half: kept
    assert replan(85.0, seconds=20.0) == 6  # epochs take twice the plan: 4 more fit
    # The first epoch's pace (once-only start-up costs in it) is not used.
    assert replan(50.0, done=1, seconds=30.0) == 10


def test_the_budget_grows_whole_epochs_once_their_pace_is_measured(monkeypatch):
    """A pessimistic first timing of whole-image steps is corrected after the first whole
    epochs: the added epochs are whole ones, the windowed ones stay as trained."""
    import types

    changed = []
    monkeypatch.setattr(budget, "set_epochs",
                        lambda run, epochs, early=None: changed.append((epochs, early)))
    # 20 epochs: 10 on 64 px windows (pace 5 s), 10 whole (predicted 20 s, measured 10 s).
    cfg = TrainConfig(size=96, resize=None, epochs=20, early_crop=64, early_fraction=0.5,
                      time_budget="1000s")
    assert cfg.early_epochs == 10
    pace = {"whole": 20.0, "window": 5.0}
    history = pd.DataFrame([{"epoch": e + 1, "seconds": 5.0, "train_size": 64}
                            for e in range(10)])

    def replan(done: int, left: float, seconds: float = 10.0):
        run = types.SimpleNamespace(cfg=cfg, pace=pace, most_epochs=40, final_s=0.0,
                                    dist=types.SimpleNamespace(world=1), log=lambda msg: None)
        run.started = time.perf_counter() - (0.95 * 1000 - left)
        rows = pd.concat([history, pd.DataFrame([{"epoch": e, "seconds": seconds,
                                                  "train_size": 96}
                                                 for e in range(11, done)])])
        changed.clear()
        budget.replan(run, rows, {"epoch": done, "seconds": seconds, "train_size": 96})
        return changed[-1] if changed else (cfg.epochs, None)

    # After the first whole epoch (10 s, not 20): 9 whole epochs planned, 128 s left. At the
    # measured 10 s, 12 fit with half an epoch to spare: 23 epochs, still 10 windowed.
    assert replan(11, left=128.0) == (23, 10)
    assert replan(12, left=128.0) == (24, 10)  # the second whole epoch may still grow it
    assert replan(13, left=128.0) == (20, None)  # later: the cosine is past its top, kept
    # Whole epochs slower than planned shrink the plan at any point, windows kept.
    assert replan(15, left=35.0, seconds=30.0) == (16, 10)


def test_mixup_blends_each_batch_with_a_shuffled_copy_and_its_loss_alike():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    y = torch.tensor([0, 1] * 4)
    seen = []

    def run(mixup: float) -> float:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))
        torch.nn.init.zeros_(model[1].weight)
        torch.nn.init.zeros_(model[1].bias)
        model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        state = engine.train_one_epoch(model, [{"x": x, "y": y, "bad": []}], opt, sched,
                                       torch.nn.CrossEntropyLoss(), torch.device("cpu"),
                                       aug_seed=5, mixup=mixup)
        return state.loss_sum / state.seen

    assert run(0.0) == pytest.approx(math.log(2))
    run(0.4)
    lam, perm = engine.mixup_draw(8, 0.4, 5)
    assert 0.5 <= lam < 1 and sorted(perm.tolist()) == list(range(8))
    assert not torch.equal(perm, torch.arange(8))
    assert torch.allclose(seen[0], x) and torch.allclose(seen[1], lam * x + (1 - lam) * x[perm])
    assert engine.mixup_draw(8, 0.4, 5)[0] == lam and engine.mixup_draw(8, 0.4, 6)[0] != lam
    # The loss follows the mix: with a model that prefers class 1, mixing changes it.
    bias = torch.tensor([0.0, 2.0])
    logits = torch.zeros(8, 2) + bias
    ce = torch.nn.functional.cross_entropy
    mixed = lam * ce(logits, y) + (1 - lam) * ce(logits, y[perm])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))
    torch.nn.init.zeros_(model[1].weight)
    with torch.no_grad():
        model[1].bias.copy_(bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    state = engine.train_one_epoch(model, [{"x": x, "y": y, "bad": []}], opt,
                                   torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                                   torch.nn.CrossEntropyLoss(), torch.device("cpu"),
                                   aug_seed=5, mixup=0.4)
    assert state.loss_sum / state.seen == pytest.approx(mixed.item(), rel=1e-5)


def test_mixup_trains_from_the_cache_and_is_refused_when_negative(fake_breakhis, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default cache folder is under the working directory
    result = fit(_cfg(fake_breakhis, tmp_path, epochs=2, mixup=0.2, batch_augment="on"),
                 progress=False)
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["mixup"] == 0.2
    assert (result.run_dir / "best.pt").is_file()
    with pytest.raises(ConfigError, match="mixup=-1"):
        _cfg(fake_breakhis, tmp_path, mixup=-1.0)


def test_patient_balance_gives_each_class_half_and_each_patient_an_equal_share():
    from breast_cancer_detection.data.datasets import patient_balanced_weights

    # Benign: patient a with 6 images, b with 2; malignant: c with 1, d with 3, and one image
    # without a patient id (a patient of its own).
    targets = np.array([0] * 8 + [1] * 5)
    patients = np.array(["a"] * 6 + ["b"] * 2 + ["c"] + ["d"] * 3 + [""])
    w = patient_balanced_weights(targets, patients)
    assert w.sum() == pytest.approx(1.0)
    share = pd.Series(w).groupby(patients).sum()
    assert share["a"] == pytest.approx(0.25) and share["b"] == pytest.approx(0.25)
    for p in ("c", "d", ""):
        assert share[p] == pytest.approx(0.5 / 3)
    assert w[targets == 1].sum() == pytest.approx(0.5)
    assert np.allclose(w[:6], w[0]) and w[6] == pytest.approx(3 * w[0])


def test_training_with_patient_balance_draws_by_patient(fake_breakhis, tmp_path, monkeypatch):
    from breast_cancer_detection.data import datasets

    seen = []
    real = datasets.EpochSampler.__init__

    def spy(self, n, *args, weights=None, **kw):
        seen.append(weights)
        real(self, n, *args, weights=weights, **kw)

    monkeypatch.setattr(datasets.EpochSampler, "__init__", spy)
    result = fit(_cfg(fake_breakhis, tmp_path, balance="patient"), progress=False)
    split = pd.read_csv(result.run_dir / "split.csv", dtype=str, keep_default_na=False)
    train = split[split["split"] == "train"]
    drawn = next(w for w in seen if w is not None and len(w) == len(train))
    share = pd.Series(drawn.numpy()).groupby(train["patient"].to_numpy()).sum()
    per_class = train.groupby("label")["patient"].nunique()
    for patient, value in share.items():
        label = train.loc[train["patient"] == patient, "label"].iloc[0]
        assert value == pytest.approx(0.5 / per_class[label] * drawn.sum().item())

"""The checkpoint format: typed record, atomic save, weights_only load, versions, one owner."""

from __future__ import annotations

import ast
import errno
import os
from pathlib import Path

import pytest
import torch

from breast_cancer_detection import checkpoint as ckpt_module
from breast_cancer_detection.checkpoint import (
    VERSION,
    Checkpoint,
    CheckpointError,
    ResumeState,
    load_checkpoint,
    save_checkpoint,
)

PACKAGE = Path(ckpt_module.__file__).parent


def _small(**kw) -> Checkpoint:
    return Checkpoint(arch="tiny", state_dict={"v": torch.ones(3)},
                      preprocessing={"size": 32, "resize": None, "mean": [0.5] * 3,
                                     "std": [0.25] * 3}, **kw)


def test_round_trip_keeps_every_field(tmp_path):
    resume = ResumeState(optimizer={"state": {}}, scheduler={"last_epoch": 3},
                         rng={"torch": torch.get_rng_state()}, step=7)
    original = _small(config={"data": "D", "group_by": "slide"}, mpp=0.972,
                      magnification=["40X"], split_hash="abc", split_patients={"train": ["1"]},
                      threshold=0.42, threshold_info={"method": "youden"},
                      metrics={"val_auc": 0.9}, epoch=5, best_epoch=4, best_score=0.9,
                      since_best=1, bad_images={"x.png": "truncated"}, resume=resume)
    path = save_checkpoint(original, tmp_path / "c.pt")
    back = load_checkpoint(path)
    for name in ("arch", "classes", "preprocessing", "config", "mpp", "magnification",
                 "split_hash", "split_patients", "threshold", "threshold_info", "metrics",
                 "epoch", "best_epoch", "best_score", "since_best", "bad_images", "versions"):
        assert getattr(back, name) == getattr(original, name), name
    assert back.data == "D" and back.group_by == "slide"
    assert back.resume.step == 7 and back.resume.scheduler == {"last_epoch": 3}
    assert torch.equal(back.state_dict["v"], torch.ones(3))
    assert torch.load(path, weights_only=True)["format"] == f"bcd-checkpoint/{VERSION}"


def test_version_1_files_still_load(tmp_path):
    # Version 1 kept the resume state at the top level and the metrics twice.
    v1 = {"format": "bcd-checkpoint/1", "arch": "tiny", "num_classes": 2,
          "classes": ["benign", "malignant"], "model": {"v": torch.ones(3)},
          "preprocessing": {"size": 32}, "config": {}, "threshold": None, "epoch": 2,
          "step": 5, "best_epoch": 2, "best_score": 0.8, "since_best": 0, "bad_images": {},
          "best_metrics": {"val_auc": 0.8}, "metrics": {"val_auc": 0.8},
          "optimizer": {"state": {}}, "scheduler": {}, "scaler": {}, "rng": {}}
    torch.save(v1, tmp_path / "old.pt")
    ckpt = load_checkpoint(tmp_path / "old.pt")
    assert ckpt.metrics == {"val_auc": 0.8} and ckpt.epoch == 2
    assert ckpt.resume is not None and ckpt.resume.step == 5


def test_an_unknown_version_says_to_upgrade(tmp_path):
    d = _small().to_dict()
    d["format"] = "bcd-checkpoint/99"
    torch.save(d, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="version 99.*Upgrade"):
        load_checkpoint(tmp_path / "new.pt")
    torch.save({"format": "something-else/1"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a bcd checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_half_precision_weights_load_as_float32(tmp_path):
    small = _small()
    small.state_dict = {"v": torch.ones(3, dtype=torch.float16), "n": torch.tensor(3)}
    save_checkpoint(small, tmp_path / "half.pt")
    back = load_checkpoint(tmp_path / "half.pt")
    assert back.state_dict["v"].dtype == torch.float32
    assert back.state_dict["n"].dtype == torch.int64


def test_atomic_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(_small(), path)
    before = path.read_bytes()

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(_small(epoch=9), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_full_disk_is_one_clear_sentence(tmp_path, monkeypatch):
    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match="could not write .*No space left.*free some disk"):
        save_checkpoint(_small(), tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "bcd-checkpoint/1", "x": _Payload()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def _indexes_a_checkpoint_by_string(tree: ast.AST) -> list[int]:
    """Lines where a name that looks like a checkpoint is indexed or .get() by a string."""
    def looks_like_checkpoint(node: ast.AST) -> bool:
        if isinstance(node, ast.Name):
            name = node.id.lower()
        elif isinstance(node, ast.Attribute):
            name = node.attr.lower()
        else:
            return False
        return "ckpt" in name or "checkpoint" in name

    lines = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Subscript) and looks_like_checkpoint(node.value)
                and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
            lines.append(node.lineno)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get" and looks_like_checkpoint(node.func.value)
                and node.args and isinstance(node.args[0], ast.Constant)):
            lines.append(node.lineno)
    return lines


def test_only_the_checkpoint_module_reads_checkpoint_keys():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "checkpoint.py":
            continue
        for line in _indexes_a_checkpoint_by_string(ast.parse(path.read_text())):
            offenders.append(f"{path.relative_to(PACKAGE)}:{line}")
    assert offenders == [], ("read checkpoint fields through bcd.checkpoint.Checkpoint, not by "
                             f"string: {offenders}")


def test_the_guard_catches_string_indexing():
    # The check above must be able to fail.
    bad = ast.parse('ckpt = load()\nx = ckpt["arch"]\ny = self.checkpoint.get("threshold")\n')
    assert _indexes_a_checkpoint_by_string(bad) == [2, 3]
    assert _indexes_a_checkpoint_by_string(ast.parse("x = ckpt.arch\n")) == []

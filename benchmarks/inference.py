#!/usr/bin/env python3
"""Inference speed on this CPU: Predictor against the seed notebook's predict(), same images.

    python benchmarks/inference.py [--images 48] [--batch-size 32]

DenseNet-121 (random weights, no download) at 224 px. The seed is timed by
``../shared/baseline/seed_pipeline.py predict`` (one image at a time, PIL + numpy) on a temporary
folder holding the 22 BreakHis samples of ``../shared/data/breakhis-samples`` cycled to N images;
ours predicts the same files with the PyTorch backend (channels-last, inference mode, batches)
and the ONNX Runtime backend, and the best is compared. Both include reading and preparing the
PNGs. Then ``bcd predict CKPT one.png`` is run cold in a fresh process, for the time to the first
prediction and its peak resident memory. Prints JSON lines; run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SEED = SHARED / "baseline" / "seed_pipeline.py"
SAMPLES = SHARED / "data" / "breakhis-samples"


def emit(record: dict) -> dict:
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                      for k, v in record.items()}), flush=True)
    return record


def cycled_images(dest: Path, n: int) -> list[Path]:
    """N files in an ImageFolder (benign/, malignant/), the samples repeated in turn."""
    samples = sorted(SAMPLES.rglob("*.png"))
    if not samples:
        raise SystemExit(f"no sample images under {SAMPLES}")
    out = []
    for i in range(n):
        src = samples[i % len(samples)]
        cls = "malignant" if "/malignant/" in str(src) else "benign"
        dst = dest / cls / f"{i:04d}-{src.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        out.append(dst)
    # The seed reads ImageFolder order (class, then name); ours gets the same list.
    return sorted(out, key=lambda p: (p.parent.name, p.name))


def save_densenet_checkpoint(path: Path) -> Path:
    from breast_cancer_detection.checkpoint import save_checkpoint, untrained_checkpoint

    return save_checkpoint(untrained_checkpoint("densenet121"), path)


def time_ours(predictor, files: list[Path], batch_size: int, backend: str) -> dict:
    predictor.predict(files[:4], batch_size=4)  # warm-up: allocator, oneDNN/ORT kernels
    start = time.perf_counter()
    out = predictor.predict(files, batch_size=batch_size)
    seconds = time.perf_counter() - start
    assert all(p.error is None for p in out)
    return emit({"what": "bcd_predict", "backend": backend, "batch_size": batch_size,
                 "images": len(files), "seconds": seconds, "images_per_s": len(files) / seconds})


# Linux carries a parent's peak RSS over into a child it forks (and through exec), so the
# child's ru_maxrss would report this script's own gigabytes. A tiny launcher process, which
# holds no model, starts the measured command and reports that child's rusage.
_LAUNCHER = (
    "import json, os, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(proc.pid, 0)\n"
    "print(json.dumps({'seconds': time.perf_counter() - start, 'maxrss_kb': usage.ru_maxrss,\n"
    "                  'status': os.waitstatus_to_exitcode(status)}))\n"
)


def cold_start(checkpoint: Path, image: Path, out_csv: Path) -> dict:
    """Wall time and peak RSS of a fresh ``bcd predict`` on one image."""
    cmd = [sys.executable, "-m", "breast_cancer_detection.cli", "predict", str(checkpoint),
           str(image), "--out", str(out_csv), "--quiet"]
    run = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True,
                         text=True)
    result = json.loads(run.stdout.strip().splitlines()[-1]) if run.stdout.strip() else {}
    if result.get("status") != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr}")
    return emit({"what": "cold_start_bcd_predict", "model": checkpoint.name,
                 "seconds": result["seconds"], "peak_rss_mb": result["maxrss_kb"] / 1024})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48, help="images per timed run (default 48)")
    ap.add_argument("--batch-size", type=int, default=32, help="our batch size (default 32)")
    args = ap.parse_args()

    from breast_cancer_detection.export import export_onnx
    from breast_cancer_detection.inference import Predictor

    emit({"what": "machine", "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
          "torch": torch.__version__})
    with tempfile.TemporaryDirectory(prefix="bcd-bench-") as tmp:
        tmp = Path(tmp)
        files = cycled_images(tmp / "images", args.images)
        ckpt = save_densenet_checkpoint(tmp / "densenet121.pt")
        onnx_path = export_onnx(ckpt, tmp / "densenet121.onnx")

        seed = subprocess.run([sys.executable, str(SEED), "predict", str(tmp / "images"),
                               "--images", str(args.images)], capture_output=True, text=True,
                              check=True)
        seed_line = json.loads(seed.stdout.strip().splitlines()[-1])
        emit(seed_line)

        ours = [time_ours(Predictor.from_checkpoint(ckpt, device="cpu"), files,
                          args.batch_size, "torch"),
                time_ours(Predictor.from_onnx(onnx_path), files, args.batch_size, "onnx")]
        best = max(ours, key=lambda r: r["images_per_s"])
        ratio = best["images_per_s"] / seed_line["images_per_s"]
        emit({"what": "ratio", "best_backend": best["backend"], "ours_images_per_s":
              best["images_per_s"], "seed_images_per_s": seed_line["images_per_s"],
              "ratio": ratio, "target": 5.0, "met": ratio >= 5.0})

        cold_start(ckpt, files[0], tmp / "one.csv")
        cold_start(onnx_path, files[0], tmp / "one.csv")


if __name__ == "__main__":
    main()

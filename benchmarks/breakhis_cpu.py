#!/usr/bin/env python3
"""What the breakhis-cpu preset costs on the full BreakHis (7,909 images) on this CPU.

    python benchmarks/breakhis_cpu.py [--steps 20] [--val 64] [--repeats 3] [--seed-batches 5]

A BreakHis-sized tree is made in a temporary folder: the 7,909 paths of
``../shared/data/breakhis-filelist.txt``, each a link to one of the real 700x460 PNGs of
``../shared/data/breakhis-real`` of the same class (cycled), so every image is real-sized and
real tissue. Then, on that tree, with the preset's own settings:

1. ``bcd prepare`` (the decoded-image cache at 256 px that training reads): wall time.
2. The engine's own timing of the first training steps and of validation (``time_steps``,
   what ``--time-budget`` plans with), on a patient-disjoint split of the whole tree (70/15/15):
   training images/s, the seconds of one epoch (training + validation), and the epochs that
   30 and 60 minutes of ``--time-budget`` buy (the budget keeps 5% and one final
   validation aside, as the engine does).
3. The seed notebook's training loop (``../shared/baseline/seed_pipeline.py train``: its
   DenseNet-121, features frozen, ImageFolder over the same tree's benign/ and malignant/,
   two loader workers): images/s, as the yardstick.

Prints the CPU first (model, cores, bf16), then JSON lines and a summary; run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import SEED, SHARED, cpu_info, emit  # noqa: E402

FILELIST = SHARED / "data" / "breakhis-filelist.txt"
REAL = SHARED / "data" / "breakhis-real"


def make_tree(dest: Path) -> Path:
    """The full BreakHis tree under ``dest``, each file a link to a real PNG of its class."""
    real = {c: sorted((REAL / "BreaKHis_v1").rglob(f"{c}/**/*.png")) for c in
            ("benign", "malignant")}
    if not all(real.values()):
        raise SystemExit(f"no real BreakHis images under {REAL}")
    paths = [p.strip() for p in FILELIST.read_text().splitlines() if p.strip()]
    counts = {"benign": 0, "malignant": 0}
    for rel in paths:
        cls = "malignant" if "/malignant/" in rel else "benign"
        target = dest / "BreaKHis_v1" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(real[cls][counts[cls] % len(real[cls])], target)
        counts[cls] += 1
    emit({"what": "tree", "images": len(paths), **counts})
    return dest / "BreaKHis_v1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="training steps timed per repeat")
    ap.add_argument("--val", type=int, default=64, help="validation images timed per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed-batches", type=int, default=5,
                    help="batches of 32 the seed's training loop is timed on")
    args = ap.parse_args()
    for need in (FILELIST, REAL, SEED):
        if not need.exists():
            raise SystemExit(f"{need} is missing: this benchmark needs ../shared beside the clone")
    print(json.dumps({"what": "cpu", **cpu_info()}), flush=True)

    from breast_cancer_detection.config import TrainConfig, load_preset
    from breast_cancer_detection.engine import build_run, fitting_epochs, time_steps

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_tree(tmp / "tree")
        cache = tmp / "cache"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "breast_cancer_detection.cli", "prepare",
                        str(data), "--size", "256", "--out", str(cache), "--quiet"], check=True)
        emit({"what": "bcd_prepare", "seconds": time.perf_counter() - start})

        settings = {**load_preset("breakhis-cpu"), "data": str(data), "cache": str(cache),
                    "runs_dir": str(tmp / "runs"), "name": "bench", "val": 0.15, "test": 0.15}
        run = build_run(TrainConfig.from_dict(settings), tmp / "runs" / "bench", None,
                        progress=False)
        train_n, val_n = len(run.train_ds), len(run.val_ds)
        rates, epochs, val_times = [], [], []
        for rep in range(args.repeats):
            step_s, val_s = time_steps(run, args.steps, val_images=args.val)
            epoch_s = run.opt.steps_per_epoch * step_s + val_s
            rates.append(run.cfg.batch_size / step_s)
            epochs.append(epoch_s)
            val_times.append(val_s)
            emit({"what": "breakhis_cpu_preset", "repeat": rep, "train_images": train_n,
                  "val_images": val_n, "train_img_per_s": rates[-1], "val_s": val_s,
                  "epoch_s": epoch_s})
        seed_rates = []
        for rep in range(args.repeats):
            out = subprocess.run([sys.executable, str(SEED), "train",
                                  str(data / "histology_slides" / "breast"), "--batches",
                                  str(args.seed_batches)], capture_output=True, text=True)
            if out.returncode != 0:
                emit({"what": "seed_train", "error": out.stderr.strip().splitlines()[-1:]})
                break
            seed_rates.append(json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"])
            emit({"what": "seed_train", "repeat": rep, "images_per_s": seed_rates[-1]})

    rate, epoch = statistics.median(rates), statistics.median(epochs)
    print(f"breakhis-cpu on {train_n} training / {val_n} validation images: "
          f"{rate:.1f} training images/s ({min(rates):.1f}-{max(rates):.1f}), one epoch "
          f"{epoch / 60:.1f} min ({min(epochs) / 60:.1f}-{max(epochs) / 60:.1f})")
    val_s = statistics.median(val_times)
    for minutes in (30, 60):
        # As the engine plans: 95% of the budget, less one final validation pass, for epochs,
        # at most the preset's `epochs`.
        left = 0.95 * minutes * 60 - val_s
        buys = fitting_epochs(run.cfg, 0, run.cfg.epochs, left, {"whole": epoch, "window": epoch})
        print(f"  --time-budget {minutes}m buys {buys} epoch(s) (the preset's most: "
              f"{run.cfg.epochs})")
    if seed_rates:
        print(f"seed's training loop: {statistics.median(seed_rates):.1f} images/s "
              f"({min(seed_rates):.1f}-{max(seed_rates):.1f}); breakhis-cpu "
              f"{rate / statistics.median(seed_rates):.2f}x "
              f"(per repeat {min(r / s for r, s in zip(rates, seed_rates)):.2f}-"
              f"{max(r / s for r, s in zip(rates, seed_rates)):.2f}x)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""CPU training throughput of the pcam-cpu recipe: the previous presets' epochs against today's.

Both sides train ``patch_cnn`` in float32 on the same PCam patches (from the prepared cache,
whole-batch augmentation in the training process) and are timed in the same run, in turns:

- ``previous``: the preset before the time budget: 8-view TTA validation every epoch, no
  weight averaging.
- ``whole``: the preset now without its early windows: one-view validation every epoch (8
  views once, on the final model), a moving average of the weights updated every step, every
  epoch on whole 96 px patches.
- ``today``: the preset now: the same, with the first half of the epochs on random 64 px
  windows (``early_crop``); its epoch is the mean over a 30-epoch schedule (15 windowed, 15
  whole).
- ``whole_compiled``: ``whole`` with ``--compile`` (torch.compile on the CPU; needs a C++
  compiler at run time), to show what it would add (``--no-compile`` skips it).

For each, ``--steps`` training steps are timed on a throwaway copy of the model (after one
warm-up step; the engine's ``time_steps``, which the time budget uses), then one validation
pass over ``--val`` patches; the epoch estimate is
steps_per_epoch x step time + the validation over all 3,000 valid patches. It prints JSON
lines (CPU model and flags first), then each side's training images/s and epoch estimate, and
the epochs per 30 minutes of today's preset against the previous preset's and against
``whole``.

    python benchmarks/train_cpu.py [--data ../shared/data/pcam-subset] [--steps 30] [--val 512]
                                   [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"


def cpu_line() -> dict:
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                     if line.startswith("model name"))
        flags = next(line for line in text.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        model = platform.processor()
    return {"what": "cpu", "model": model, "cores": torch.get_num_threads(),
            "avx2": " avx2" in flags, "avx512f": " avx512f" in flags,
            "avx512_bf16": " avx512_bf16" in flags, "amx": " amx_tile" in flags}


def build(data: Path, runs: Path, name: str, **overrides):
    """The run (datasets, model, optimiser) the preset builds, with ``overrides``."""
    from breast_cancer_detection.config import TrainConfig, load_preset
    from breast_cancer_detection.engine import build_run

    settings = {**load_preset("pcam-cpu"), "data": str(data), "runs_dir": str(runs),
                "name": name, "amp": "off", "time_budget": None, **overrides}
    return build_run(TrainConfig.from_dict(settings), runs / name, None, progress=False)


def time_side(run, steps: int, n_val: int, tta: bool, compiled: bool) -> dict:
    """The engine's own timing of the first steps (the one the time budget uses); with early
    windows, the epoch is the mean over a 30-epoch schedule of windowed and whole epochs."""
    from breast_cancer_detection.engine import epoch_costs, time_steps

    step_s, val_s = time_steps(run, steps, tta=tta, compiled=compiled, val_images=n_val)
    steps_per_epoch = run.opt.steps_per_epoch
    out = {"train_img_per_s": run.cfg.batch_size / step_s, "step_s": step_s,
           "val_s_per_epoch": val_s, "epoch_s": steps_per_epoch * step_s + val_s}
    if run.cfg.early_crop:
        window_s, _ = time_steps(run, steps, window=run.cfg.early_crop, validate=False)
        # The schedule's epochs as the time budget costs them (validation left out for the
        # training rate, kept in for the epoch).
        costs = epoch_costs(run.cfg, 30, {"whole": steps_per_epoch * step_s,
                                          "window": steps_per_epoch * window_s})
        out.update(window_step_s=window_s,
                   window_img_per_s=run.cfg.batch_size / window_s,
                   epoch_s=sum(costs) / 30 + val_s,
                   train_img_per_s=run.cfg.batch_size * steps_per_epoch * 30 / sum(costs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "pcam-subset")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--val", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled side")
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: no PCam folder; pass --data.")
    print(json.dumps(cpu_line()), flush=True)
    sides = {"previous": ({"ema": None, "early_crop": None}, True, False),
             "whole": ({"early_crop": None}, False, False), "today": ({}, False, False)}
    if not args.no_compile:
        sides["whole_compiled"] = ({"early_crop": None}, False, True)
    results: dict[str, list[dict]] = {k: [] for k in sides}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {k: build(args.data, Path(tmp), k, **o) for k, (o, _, _) in sides.items()}
        for rep in range(args.repeats):  # in turns, so drifts in the machine hit every side
            for k, (_, tta, compiled) in sides.items():
                r = time_side(runs[k], args.steps, args.val, tta, compiled)
                results[k].append(r)
                print(json.dumps({"what": k, "repeat": rep, **r}), flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in results.items()}
    for k, m in med.items():
        print(f"{k:>15}: {m['train_img_per_s']:6.0f} training img/s, epoch "
              f"{m['epoch_s']:5.0f} s ({m['val_s_per_epoch']:.0f} s of it validation)")
    if "window_step_s" in med["today"]:
        print(f"{'today':>15}: {med['today']['window_img_per_s']:6.0f} training img/s on 64 px "
              "windows")
    for base in ("previous", "whole"):
        ratio = med[base]["epoch_s"] / med["today"]["epoch_s"]
        spread = [p["epoch_s"] / t["epoch_s"] for p, t in zip(results[base], results["today"])]
        print(f"epochs per 30 minutes: today {1800 / med['today']['epoch_s']:.1f}, {base} "
              f"{1800 / med[base]['epoch_s']:.1f}: {ratio:.2f}x (per repeat "
              f"{min(spread):.2f}-{max(spread):.2f}x)")


if __name__ == "__main__":
    main()

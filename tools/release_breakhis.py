#!/usr/bin/env python3
"""Makes a released BreakHis checkpoint from a run trained on every image and its cross-validation.

    python tools/release_breakhis.py RUN/last.pt CV_FOLDER OUT.pt

The run trained on all images (``--val 0 --test 0``), so no held-out image of its own can pick
its threshold; the threshold is chosen instead on the out-of-fold predictions of ``bcd cv``
with the same settings (``CV_FOLDER/oof_predictions.csv``: every image scored by the fold
model that never saw its patient), by Youden's J. The training state (optimiser, generator)
is dropped; the weights are kept as trained (float32). Prints the file's size and SHA-256
for the registry and the model card.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from breast_cancer_detection.checkpoint import load_checkpoint, save_checkpoint
from breast_cancer_detection.data.download import sha256_of
from breast_cancer_detection.metrics import choose_threshold


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="last.pt of the run trained on every image")
    ap.add_argument("cv", type=Path, help="the `bcd cv --out` folder of the same settings")
    ap.add_argument("out", type=Path, help="the released file to write")
    args = ap.parse_args()

    oof = pd.read_csv(args.cv / "oof_predictions.csv", dtype={"patient": str})
    value = float(choose_threshold(oof["target"].to_numpy(), oof["probability"].to_numpy(),
                                   "youden"))
    ckpt = load_checkpoint(args.checkpoint)
    if ckpt.split_patients.get("val") or ckpt.split_patients.get("test"):
        raise SystemExit(f"{args.checkpoint} held patients out of training "
                         f"({', '.join(k for k in ('val', 'test') if ckpt.split_patients.get(k))}"
                         "): train the release on every image (--val 0 --test 0).")
    ckpt.resume = None
    ckpt = ckpt.with_threshold(value, {
        "method": "youden", "value": value, "chosen_on": "cv out-of-fold",
        "images": len(oof), "patients": int(oof["patient"].nunique()),
        "folds": int(oof["fold"].nunique())})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(ckpt, args.out)
    print(f"{args.out}: {args.out.stat().st_size:,} bytes, threshold {value:.4f} (Youden's J on "
          f"{len(oof)} out-of-fold predictions), sha256 {sha256_of(args.out)}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""ROC AUC of several checkpoints on one labelled folder: each alone, and their average.

    python tools/ensemble_auc.py FOLDER CKPT CKPT... [--tta] [--bootstrap 1000]

FOLDER is an ImageFolder (``FOLDER/<class>/*``, classes benign/malignant or 0/1...), e.g.
``../shared/data/pcam-subset/valid``. Every checkpoint predicts every image (ONNX Runtime on a
CPU, as ``bcd predict --backend auto``); the ensemble's probability is the mean of theirs.
It answers one question before anyone builds ensembles into training: do runs of a recipe
make different errors (then averaging them gains AUC), or the same ones? Images are resampled
one by one for the ensemble's bootstrap interval (a folder has no patient ids).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from breast_cancer_detection.data.breakhis import build_index
from breast_cancer_detection.inference import Predictor
from breast_cancer_detection.metrics import accuracy, bootstrap_ci, choose_threshold, roc_auc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("checkpoints", type=Path, nargs="+")
    ap.add_argument("--tta", action="store_true", help="8 dihedral views per image")
    ap.add_argument("--bootstrap", type=int, default=1000, help="resamples (default 1000)")
    args = ap.parse_args()
    if len(args.checkpoints) < 2:
        raise SystemExit("give two checkpoints or more: one alone is `bcd evaluate`.")

    index = build_index(args.folder)
    files = [args.folder / p for p in index["path"]]
    y = index["label"].eq("malignant").to_numpy().astype(int)
    probs = {}
    for ckpt in args.checkpoints:
        pred = Predictor.from_checkpoint(ckpt, device="cpu", progress=False).on_backend("auto")
        out = pred.predict(files, tta=args.tta, batch_size=64)
        bad = [o.error for o in out if o.error]
        if bad:
            raise SystemExit(f"{ckpt}: {len(bad)} images gave no prediction, e.g. {bad[0]}")
        probs[str(ckpt)] = np.array([o.p_malignant for o in out])
        print(json.dumps({"checkpoint": str(ckpt), "images": len(files),
                          "roc_auc": round(roc_auc(y, probs[str(ckpt)]), 4)}), flush=True)
    names = list(probs)
    for k in range(2, len(names) + 1):
        aucs = [roc_auc(y, np.mean([probs[n] for n in c], axis=0))
                for c in itertools.combinations(names, k)]
        print(json.dumps({"models": k, "combinations": len(aucs),
                          "roc_auc_min": round(min(aucs), 4),
                          "roc_auc_max": round(max(aucs), 4)}))
    mean = np.mean([probs[n] for n in names], axis=0)
    table = pd.DataFrame({"target": y, "probability": mean})
    low, high = bootstrap_ci(table, lambda d: roc_auc(d["target"], d["probability"]),
                             n=args.bootstrap, group=None)
    threshold = choose_threshold(y, mean)  # as `bcd evaluate --subset val` chooses it
    print(json.dumps({"ensemble_of": len(names), "roc_auc": round(roc_auc(y, mean), 4),
                      "roc_auc_95ci": [round(low, 4), round(high, 4)],
                      "threshold_youden": round(threshold, 4),
                      "accuracy": round(accuracy(y, mean, threshold), 4),
                      "note": "the threshold is chosen on this same folder: accuracy leans "
                              "optimistic"}))


if __name__ == "__main__":
    main()

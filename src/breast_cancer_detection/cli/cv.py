"""`bcd cv`: patient-disjoint k-fold cross-validation, end to end."""

from __future__ import annotations

import argparse

from . import options

_CV_TRAIN_KEYS = ("model", "epochs", "size", "batch_size", "lr", "pretrained", "freeze_backbone",
                  "freeze_early", "balance", "device", "workers", "magnification", "seed")


def add_parser(sub) -> None:
    """`bcd cv`: its options, the training ones as `bcd train` has them."""
    c = sub.add_parser("cv", help="patient-disjoint k-fold cross-validation, end to end",
                       description="Deal patients into K folds; for each fold train on K-2, "
                       "pick epoch and threshold on one, evaluate on the held-out one; report "
                       "mean +- std of every metric over folds, overall and per magnification.")
    c.add_argument("--data", required=True, help="data folder (BreakHis tree)")
    c.add_argument("--folds", type=int, default=5, help="number of folds, >= 3 (default 5)")
    c.add_argument("--out", help="output folder (default: reports/cv-MODEL-Kfold)")
    options.preset(c, "training preset (cpu-smoke, breakhis-gpu, ...) or YAML")
    for name in _CV_TRAIN_KEYS:
        options.train_flag(c, name, help="seed of the folds and the training"
                           if name == "seed" else None)
    options.bootstrap(c, "bootstrap resamples per fold report (default 1000)")
    options.target_sensitivity(c)
    options.quiet(c, "no progress bars")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`bcd cv`: train and evaluate every fold, then the summary."""
    from ..config import load_preset
    from ..cv import run_cv

    settings = load_preset(args.preset) if args.preset else {}
    settings.update({k: getattr(args, k) for k in _CV_TRAIN_KEYS if hasattr(args, k)})
    out = args.out or f"reports/cv-{settings.get('model', 'densenet121')}-{args.folds}fold"
    try:
        result = run_cv(args.data, folds=args.folds, settings=settings, out=out,
                        bootstrap=args.bootstrap, target_sensitivity=args.target_sensitivity,
                        progress=not args.quiet)
    except KeyboardInterrupt:
        return 130
    from ..report import POOLED, value_ci

    overall = result.summary[result.summary["scope"] == "all"].set_index("metric")
    print("Mean +- std over the folds:")
    for key in ("image.accuracy", "image.roc_auc", "patient.recognition_rate"):
        if key in overall.index:
            print(f"  {key}: {overall.at[key, 'mean']:.4f} +- {overall.at[key, 'std']:.4f}")
    if result.pooled:
        print("Out-of-fold predictions pooled (patient-bootstrap 95% CI):")
        for key, label in POOLED:
            print(f"  {label}: {value_ci(result.pooled.get(key))}")
    print(f"Report: {result.out_dir / 'report.md'}")
    return 0

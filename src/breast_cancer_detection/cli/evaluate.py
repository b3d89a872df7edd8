"""`bcd evaluate`: a checkpoint's metrics with CIs, plots and report."""

from __future__ import annotations

import argparse
import sys

from . import options


def add_parser(sub) -> None:
    """`bcd evaluate`: its options."""
    e = sub.add_parser("evaluate", help="evaluate a checkpoint: metrics, CIs, plots, report",
                       description="Run a checkpoint over a subset of a split; choose the "
                       "threshold on the split's val subset (stored in the checkpoint); write "
                       "metrics.json, predictions.csv, PNG plots and report.md. Exits "
                       "3 when the evaluated patients overlap the checkpoint's training data.")
    options.checkpoint(e, "best.pt / last.pt from `bcd train`")
    e.add_argument("--data", help="data folder the split's paths are relative to (default: the "
                   "one in the checkpoint's config)")
    e.add_argument("--split", help="split CSV (default: split.csv next to the checkpoint; "
                   "without one, every image under --data is evaluated)")
    e.add_argument("--subset", help="subset to evaluate: test (the default), val, train, or all "
                   "(the only one of external data or a folder without subsets, and its default)")
    e.add_argument("--out", help="report folder (default: reports/<run name>-<subset>)")
    e.add_argument("--store-threshold", action=argparse.BooleanOptionalAction, default=True,
                   help="store the threshold chosen on val in the checkpoint, for predictions "
                   "to use (default); --no-store-threshold leaves the file as it is")
    options.target_sensitivity(e, "choose the threshold reaching this sensitivity on val "
                               "(e.g. 0.95) instead of Youden's J")
    options.bootstrap(e, "bootstrap resamples of patients for the 95%% CIs "
                      "(0: none; default 1000)")
    options.seed(e, "bootstrap seed (default 0)")
    options.tta(e, "average each image over its 8 flips/rotations")
    e.add_argument("--allow-leakage", action="store_true",
                   help="exit 0 even when evaluated patients were in training (still reported)")
    options.device(e)
    options.batch_size(e, 64)
    options.workers(e, 0, "DataLoader workers (default 0)")
    options.quiet(e)
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`bcd evaluate`: the metrics said; exit 3 on leakage."""
    from ..evaluation import LEAKAGE_EXIT_CODE, evaluate_checkpoint

    ev = evaluate_checkpoint(
        args.checkpoint, args.data, split=args.split, subset=args.subset, out=args.out,
        target_sensitivity=args.target_sensitivity, bootstrap=args.bootstrap, seed=args.seed,
        allow_leakage=args.allow_leakage, device=args.device, batch_size=args.batch_size,
        workers=args.workers, progress=not args.quiet, tta=args.tta,
        store_threshold=args.store_threshold)
    from ..report import format_ci

    m = ev.metrics
    img, pat = m.image, m.patient

    def show(section: str, key: str) -> str:
        value = getattr(m, section).get(key)
        if value is None or value != value:
            return "n/a"
        ci = format_ci(m.ci.get(section, {}).get(key), digits=4, sep="-")
        return f"{value:.4f}" + (f" (95% CI {ci})" if ci != "n/a" else "")

    for line in m.caveats:
        print(f"CAVEAT: {line}", file=sys.stderr)
    print(f"{m.subset}: {img['images']} images"
          + (f", {pat['patients']} patients" if "patients" in pat else ", no patient ids")
          + f"; threshold {m.threshold['value']:.4f} ({m.threshold['source']})")
    print(f"  accuracy {show('image', 'accuracy')}, AUC {show('image', 'roc_auc')}, "
          f"sensitivity {show('image', 'sensitivity')}, specificity "
          f"{show('image', 'specificity')}")
    if "recognition_rate" in pat:
        print(f"  patient recognition rate {show('patient', 'recognition_rate')}, "
              f"patient AUC {show('patient', 'roc_auc')}")
    print(f"Report: {ev.report}")
    if ev.leaked:
        print("LEAKAGE: " + " ".join(ev.leakage)
              + ("" if args.allow_leakage else " Exit code "
                 f"{LEAKAGE_EXIT_CODE}; pass --allow-leakage to accept it."), file=sys.stderr)
        if not args.allow_leakage:
            return LEAKAGE_EXIT_CODE
    return 0

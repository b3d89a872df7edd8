"""The `bcd` command line: each subcommand is a thin call into the package."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Heavy imports (torch, pandas, PIL) live inside the command bodies so `bcd --help` is instant.


def _cmd_download(args: argparse.Namespace) -> int:
    from .data.download import download_breakhis

    root = download_breakhis(args.dest, source=args.source, progress=not args.quiet)
    print(f"BreakHis is at {root}")
    return 0


def _load_or_build_index(path: str, group_by: str = "patient"):
    """An index CSV is read; a folder is indexed on the fly."""
    from .data.breakhis import build_index, read_index

    p = Path(path)
    return build_index(p, group_by=group_by) if p.is_dir() else read_index(p)


def _cmd_index(args: argparse.Namespace) -> int:
    from .data.breakhis import (
        build_index,
        check_breakhis_complete,
        count_non_images,
        summarize_index,
        verify_images,
        write_index,
    )

    index = build_index(args.root, group_by=args.group_by)
    print(summarize_index(index))
    skipped = count_non_images(args.root)
    if skipped:
        print(f"\n{skipped} file(s) that are not images were ignored.")
    problems = check_breakhis_complete(index)
    if problems:
        print("\nWARNING: this BreakHis copy is incomplete:\n  " + "\n  ".join(problems)
              + "\nRe-run `bcd download` (or re-extract BreaKHis_v1.tar.gz) to get every image.",
              file=sys.stderr)
    status = 0
    if args.verify:
        bad = verify_images(args.root, index, progress=not args.quiet)
        for b in bad:
            print(f"BAD IMAGE {b.path}: {b.reason}", file=sys.stderr)
        print(f"\nverify: {len(index) - len(bad)} of {len(index)} images decode; {len(bad)} bad.")
        status = 1 if bad else 0
    if args.out:
        print(f"\nIndex of {len(index)} images written to {write_index(index, args.out)}")
    if problems and args.strict:
        return 1
    return status


def _cmd_split(args: argparse.Namespace) -> int:
    from .data.splits import (
        make_folds,
        make_split,
        read_protocol_folds,
        summarize_split,
        write_split,
    )

    index = _load_or_build_index(args.index, args.group_by)
    if args.protocol:
        split = read_protocol_folds(args.protocol, index, args.fold, args.magnification)
    elif args.folds:
        split = make_folds(index, folds=args.folds, seed=args.seed,
                           magnification=args.magnification)
        per = split.groupby("fold").agg(images=("path", "size"), patients=("patient", "nunique"),
                                        malignant=("target", "mean"))
        print(per.to_string())
    else:
        split = make_split(index, val=args.val, test=args.test, seed=args.seed,
                           magnification=args.magnification)
    if "fold" not in split.columns:
        print(summarize_split(split))
        print("No patient is in more than one subset.")
    print(f"Split written to {write_split(split, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for `bcd` and all its subcommands."""
    p = argparse.ArgumentParser(
        prog="bcd",
        description="Breast cancer detection in histopathology images (BreakHis), split by "
        "patient.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = sub.add_parser("download", help="download and extract BreakHis v1",
                       description="Download BreaKHis_v1.tar.gz (resumable), check and extract it.")
    d.add_argument("--dest", default="data", help="folder to put BreaKHis_v1 in (default: data)")
    d.add_argument("--source", default="auto",
                   help="ufpr (official site), gdrive (mirror via gdown), auto (both, in that "
                   "order), or a URL")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_cmd_download)

    i = sub.add_parser("index", help="index a data folder into a CSV table",
                       description="Build the table path,label,subtype,patient,slide,"
                       "magnification from a BreakHis copy or an ImageFolder, and summarise it.")
    i.add_argument("root", help="data folder (BreakHis tree or ImageFolder)")
    i.add_argument("--out", help="write the index CSV here")
    i.add_argument("--verify", action="store_true", help="decode every image; list bad ones")
    i.add_argument("--group-by", choices=["patient", "slide"], default="patient",
                   help="patient: numeric BreakHis id (default, cannot leak); slide: folder id")
    i.add_argument("--strict", action="store_true", help="fail on an incomplete BreakHis copy")
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    i.set_defaults(func=_cmd_index)

    s = sub.add_parser("split", help="patient-disjoint train/val/test split or k folds",
                       description="Write a split CSV (path,patient,label,magnification,split) "
                       "with no patient in two subsets.")
    s.add_argument("index", help="index CSV from `bcd index`, or a data folder")
    s.add_argument("--out", required=True, help="split CSV to write")
    s.add_argument("--val", type=float, default=0.15, help="validation share (default 0.15)")
    s.add_argument("--test", type=float, default=0.15, help="test share (default 0.15)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--folds", type=int, help="write K patient-disjoint folds instead")
    s.add_argument("--magnification", nargs="+", metavar="MAG", help="e.g. 40X 100X")
    s.add_argument("--group-by", choices=["patient", "slide"], default="patient")
    s.add_argument("--protocol", metavar="FILE",
                   help="official BreakHis fold file (Folds.csv or dsfoldN.txt)")
    s.add_argument("--fold", type=int, default=1, help="which protocol fold (with --protocol)")
    s.set_defaults(func=_cmd_split)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `bcd`; returns the exit code."""
    args = build_parser().parse_args(argv)
    from .errors import UserError

    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`bcd download`, `bcd index`, `bcd prepare`, `bcd split`: from files to a split table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import common, options


def add_parsers(sub) -> None:
    """download, index, prepare, split: from files to a split table."""
    for add in (add_download, add_index, add_prepare, add_split):
        add(sub)


def add_download(sub) -> None:
    """`bcd download`: its options."""
    d = sub.add_parser("download", help="download and extract BreakHis v1",
                       description="Download BreaKHis_v1.tar.gz (resumable), check and extract it.")
    d.add_argument("--dest", default="data", help="folder to put BreaKHis_v1 in (default: data)")
    d.add_argument("--source", default="auto",
                   help="ufpr (official site), gdrive:FILE_ID (a Google Drive mirror via gdown; "
                   "or set BCD_BREAKHIS_GDRIVE_ID), auto (ufpr, then the mirror), or a URL")
    options.quiet(d)
    d.set_defaults(func=run_download)


def run_download(args: argparse.Namespace) -> int:
    """`bcd download`: fetch and extract BreakHis."""
    from ..data.download import download_breakhis

    root = download_breakhis(args.dest, source=args.source, progress=not args.quiet)
    print(f"BreakHis is at {root}")
    return 0


def add_index(sub) -> None:
    """`bcd index`: its options."""
    i = sub.add_parser("index", help="index a data folder into a CSV table",
                       description="Build the table path,label,subtype,patient,slide,"
                       "magnification from a BreakHis copy or an ImageFolder, and summarise it.")
    options.data_root(i)
    i.add_argument("--out", help="write the index CSV here")
    i.add_argument("--verify", action="store_true", help="decode every image; list bad ones")
    options.group_by(i, "the patient column: numeric BreakHis id (default) or slide folder")
    i.add_argument("--strict", action="store_true", help="fail on an incomplete BreakHis copy")
    options.quiet(i)
    i.set_defaults(func=run_index)


def run_index(args: argparse.Namespace) -> int:
    """`bcd index`: the table of a data folder, checked."""
    from ..data.breakhis import (
        build_index,
        check_breakhis_complete,
        count_non_images,
        summarize_index,
        verify_images,
        write_index,
    )
    from ..files import plural

    out = common.csv_out(args.out, "index.csv") if args.out else None
    index = build_index(args.root, group_by=args.group_by)
    print(summarize_index(index))
    skipped = count_non_images(args.root)
    if skipped:
        print(f"\nIgnored: {plural(skipped, 'file')} that {'is' if skipped == 1 else 'are'} "
              "not an image.")
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
    if out:
        print(f"\nIndex of {len(index)} images written to {write_index(index, out)}")
    if problems and args.strict:
        return 1
    return status


def add_prepare(sub) -> None:
    """`bcd prepare`: its options."""
    pr = sub.add_parser("prepare", help="decode and resize every image once into a cache",
                        description="Decode every image of ROOT once, resize it so its short "
                        "side is SIZE, and store all of them in one memory-mapped array that "
                        "training reads instead of the PNGs (BreakHis at 256 px: 2.4 GB).")
    options.data_root(pr)
    pr.add_argument("--size", type=int, required=True,
                    help="short side in pixels; use the eval resize (e.g. 256)")
    pr.add_argument("--out", help="cache folder (default: data/cache/NAME-HASH-SIZEpx here)")
    options.workers(pr, 2, "decoding processes (default: 2)")
    options.quiet(pr)
    pr.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    """`bcd prepare`: the decoded-image cache."""
    import json
    import time

    from ..data.breakhis import build_index
    from ..data.cache import default_cache_dir, prepare_cache

    index = build_index(args.root)
    start = time.perf_counter()
    out = prepare_cache(args.root, index, args.size, args.out, progress=not args.quiet,
                        workers=args.workers)
    seconds = time.perf_counter() - start
    n = index["path"].nunique()
    megabytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6
    manifest = json.loads((out / "manifest.json").read_text())
    h, w = manifest["shape"][1:3]
    print(f"Cache of {n} images at {w}x{h} px written to {out}")
    print(f"{megabytes:,.0f} MB on disk; built in {seconds:.1f} s ({n / seconds:,.0f} images/s)")
    for path, reason in manifest["bad"].items():
        print(f"BAD IMAGE {path}: {reason}", file=sys.stderr)
    if manifest["bad"]:
        print(f"{len(manifest['bad'])} image(s) could not be decoded; training skips them.",
              file=sys.stderr)
    if out.resolve() == default_cache_dir(args.root, args.size).resolve():
        print(f"Training uses it automatically while it is fresh: `bcd train --data {args.root} "
              "...` run from this folder. Changing, adding or removing images makes it stale; "
              f"then run `bcd prepare {args.root} --size {args.size}` again.")
    else:
        print(f"Not the default location {default_cache_dir(args.root, args.size)}: training "
              "looks only there, so move it there or prepare without --out.")
    return 0


def add_split(sub) -> None:
    """`bcd split`: its options."""
    s = sub.add_parser("split", help="patient-disjoint train/val/test split or k folds",
                       description="Write a split CSV (path,patient,label,magnification,split) "
                       "with no patient in two subsets.")
    s.add_argument("index", help="index CSV from `bcd index`, or a data folder")
    s.add_argument("--out", required=True, help="split CSV to write")
    s.add_argument("--val", type=float, default=0.15, help="validation share (default 0.15)")
    s.add_argument("--test", type=float, default=0.15, help="test share (default 0.15)")
    options.seed(s)
    s.add_argument("--folds", type=int, help="write K patient-disjoint folds instead")
    s.add_argument("--magnification", nargs="+", metavar="MAG", help="e.g. 40X 100X")
    options.group_by(s)
    s.add_argument("--protocol", metavar="FILE",
                   help="official BreakHis fold file (Folds.csv or dsfoldN.txt)")
    s.add_argument("--fold", type=int, default=1, help="which protocol fold (with --protocol)")
    s.set_defaults(func=run_split)


def run_split(args: argparse.Namespace) -> int:
    """`bcd split`: a patient-disjoint split or folds."""
    from ..data.splits import (
        make_folds,
        make_split,
        read_protocol_folds,
        summarize_split,
        write_split,
    )

    out = common.csv_out(args.out, "split.csv")
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
    print(f"Split written to {write_split(split, out)}")
    return 0


def _load_or_build_index(path: str, group_by: str = "patient"):
    """An index CSV is read; a folder is indexed on the fly."""
    from ..data.breakhis import build_index, read_index

    p = Path(path)
    return build_index(p, group_by=group_by) if p.is_dir() else read_index(p)

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


def _train_settings(args: argparse.Namespace) -> dict:
    """Preset values, overridden by the options given on the command line."""
    import yaml

    from .config import load_preset

    given = {k: v for k, v in vars(args).items()
             if k not in ("command", "func", "preset", "resume", "quiet", "aug")}
    settings = load_preset(args.preset) if getattr(args, "preset", None) else {}
    augment = dict(settings.get("augment") or {})
    for item in getattr(args, "aug", None) or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--aug takes KEY=VALUE (e.g. hed=0.1), not {item!r}")
        augment[key.strip()] = yaml.safe_load(value)
    settings.update(given)
    if augment:
        settings["augment"] = augment
    return settings


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .engine import fit

    settings = _train_settings(args)
    try:
        if args.resume:
            fit(TrainConfig(), resume=args.resume, progress=not args.quiet, overrides=settings)
        else:
            fit(TrainConfig.from_dict(settings), progress=not args.quiet)
    except KeyboardInterrupt:
        return 130
    return 0


def _add_train_options(t: argparse.ArgumentParser) -> None:
    from .config import TrainConfig

    d = TrainConfig.__dataclass_fields__

    def default(name: str) -> str:
        return f" (default: {d[name].default})"

    S = argparse.SUPPRESS  # only options actually given override the preset
    t.add_argument("--preset", help="bundled preset (cpu-smoke, breakhis-gpu, pcam-cpu) or a "
                   "YAML file; options given here override it")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue runs/NAME from its last.pt")
    g = t.add_argument_group("data")
    g.add_argument("--data", default=S, help="data folder; omitted: download BreakHis to data/")
    g.add_argument("--split", default=S, help="split CSV from `bcd split`; omitted: a "
                   "patient-disjoint split is made and saved in the run folder")
    g.add_argument("--val", type=float, default=S, help="validation share" + default("val"))
    g.add_argument("--test", type=float, default=S, help="test share" + default("test"))
    g.add_argument("--magnification", nargs="+", default=S, metavar="MAG")
    g.add_argument("--group-by", choices=["patient", "slide"], default=S)
    g = t.add_argument_group("model")
    g.add_argument("--model", default=S, help="architecture" + default("model")
                   + "; see `bcd models`")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=S,
                   help="random initial weights instead of ImageNet's")
    g.add_argument("--weights", default=S, help="local state dict or checkpoint to start from")
    g.add_argument("--freeze-backbone", action="store_true", default=S,
                   help="train only the head (the original notebook's choice)")
    g.add_argument("--size", type=int, default=S, help="input side in pixels" + default("size"))
    g.add_argument("--resize", type=int, default=S, help="eval resize before the centre crop")
    g.add_argument("--aug", action="append", metavar="KEY=VALUE",
                   help="augmentation setting, e.g. --aug hed=0.1 --aug rot90=false")
    g = t.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=S, help=default("epochs").strip())
    g.add_argument("--batch-size", type=int, default=S, help=default("batch_size").strip())
    g.add_argument("--lr", type=float, default=S, help=default("lr").strip())
    g.add_argument("--weight-decay", type=float, default=S)
    g.add_argument("--warmup-epochs", type=float, default=S)
    g.add_argument("--label-smoothing", type=float, default=S)
    g.add_argument("--balance", choices=["loss", "sampler", "none"], default=S,
                   help="class imbalance handling" + default("balance"))
    g.add_argument("--early-stop", type=int, default=S, metavar="EPOCHS")
    g.add_argument("--seed", type=int, default=S)
    g = t.add_argument_group("machine and output")
    g.add_argument("--device", default=S, help="auto, cpu, cuda, cuda:1" + default("device"))
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default=S)
    g.add_argument("--compile", action="store_true", default=S, help="torch.compile the model")
    g.add_argument("--workers", type=int, default=S, help=default("workers").strip())
    g.add_argument("--max-bad-fraction", type=float, default=S)
    g.add_argument("--runs-dir", default=S, help=default("runs_dir").strip())
    g.add_argument("--name", default=S, help="run folder name (default: MODEL-DATE-TIME)")
    g.add_argument("--tensorboard", action="store_true", default=S)
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models

    print("\n".join(list_models()))
    print("(any timm model name also works when timm is installed)")
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
                   help="ufpr (official site), gdrive:FILE_ID (a Google Drive mirror via gdown; "
                   "or set BCD_BREAKHIS_GDRIVE_ID), auto (ufpr, then the mirror), or a URL")
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

    t = sub.add_parser("train", help="train a model (the main job)",
                       description="Train on a data folder with a patient-disjoint split; "
                       "writes runs/NAME/{config.yaml,split.csv,metrics.csv,last.pt,best.pt}. "
                       "Under torchrun it trains with DistributedDataParallel.")
    _add_train_options(t)
    t.set_defaults(func=_cmd_train)

    m = sub.add_parser("models", help="list the architectures create_model knows")
    m.set_defaults(func=_cmd_models)
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

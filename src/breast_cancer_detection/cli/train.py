"""`bcd train`: one flag per TrainConfig field over a preset, then a training run."""

from __future__ import annotations

import argparse
import dataclasses

from . import options


def add_parser(sub) -> None:
    """`bcd train`: its options, a flag per TrainConfig field."""
    t = sub.add_parser("train", help="train a model (the main job)",
                       description="Train on a data folder with a patient-disjoint split; "
                       "writes runs/NAME/{config.yaml,split.csv,metrics.csv,last.pt,best.pt}. "
                       "Under torchrun it trains with DistributedDataParallel.")
    _add_train_options(t)
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`bcd train`: a training run, or the rest of one."""
    from ..config import TrainConfig
    from ..engine import Terminated, fit, resume

    settings = train_settings(args)
    try:
        if args.resume:
            resume(args.resume, settings, progress=not args.quiet)
        else:
            fit(TrainConfig.from_dict(settings), progress=not args.quiet)
    except Terminated:
        return 143  # 128 + SIGTERM, as shells and schedulers expect
    except KeyboardInterrupt:
        return 130  # 128 + SIGINT
    return 0


# `bcd train --help` groups: the first TrainConfig field of each (fields are in this order).
_TRAIN_GROUPS = {"data": "data", "model": "model", "epochs": "optimisation",
                 "device": "machine and output"}


def _add_train_options(t: argparse.ArgumentParser) -> None:
    from ..config import TrainConfig, list_presets

    options.preset(t, f"bundled preset ({', '.join(list_presets())}) or a YAML file; "
                   "options given here override it")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue runs/NAME from its last.pt")
    group: argparse.ArgumentParser | argparse._ArgumentGroup = t
    for f in dataclasses.fields(TrainConfig):
        if f.name in _TRAIN_GROUPS:
            group = t.add_argument_group(_TRAIN_GROUPS[f.name])
        options.train_flag(group, f.name)
    options.quiet(group, "no progress bars")


def train_settings(args: argparse.Namespace) -> dict:
    """Preset values, overridden by the options given on the command line."""
    import yaml

    from ..config import load_preset

    given = {k: v for k, v in vars(args).items()
             if k not in ("command", "func", "preset", "resume", "quiet", "augment")}
    settings = load_preset(args.preset) if getattr(args, "preset", None) else {}
    augment = dict(settings.get("augment") or {})
    for item in getattr(args, "augment", None) or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--aug takes KEY=VALUE (e.g. hed=0.1), not {item!r}")
        augment[key.strip()] = yaml.safe_load(value)
    settings.update(given)
    if augment:
        settings["augment"] = augment
    return settings

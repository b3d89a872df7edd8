"""The `bcd` command line: each subcommand is a thin call into the package.

One module per command (or small family), its options (``add_parser``) next to its body
(``run``), after TIAToolbox's CLI: :mod:`.data` (download, index, prepare, split),
:mod:`.train`, :mod:`.models`, :mod:`.evaluate`, :mod:`.cv`, :mod:`.predict`, :mod:`.slide`,
:mod:`.export`, :mod:`.serve`, :mod:`.tour` (notebook, demo-slide). The options several
commands share are in :mod:`.options`, what several commands do alike in :mod:`.common`.
"""

from __future__ import annotations

import argparse
import sys

from . import cv, data, evaluate, export, models, predict, serve, slide, tour, train
from .options import field_docstrings, plain_help, train_flag_help

# Heavy imports (torch, pandas, PIL) live inside the command bodies so `bcd --help` is instant.

__all__ = ["build_parser", "field_docstrings", "main", "plain_help", "train_flag_help"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for `bcd` and all its subcommands."""
    p = argparse.ArgumentParser(
        prog="bcd",
        description="Breast cancer detection in histopathology images (BreakHis), split by "
        "patient.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # download, index, prepare, split: from files to a split table.
    data.add_parsers(sub)
    # train, models, evaluate, cv: from a split to a checkpoint and its report.
    for command in (train, models, evaluate, cv):
        command.add_parser(sub)
    # predict, slide, export, serve: using a checkpoint.
    for command in (predict, slide, export, serve):
        command.add_parser(sub)
    tour.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `bcd`; returns the exit code."""
    import warnings

    args = build_parser().parse_args(argv)
    from ..errors import UserError

    # A warning reaches a command-line user as one line, not as a Python source location.
    plain = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = plain


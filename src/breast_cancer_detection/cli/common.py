"""What several `bcd` commands do alike: where an ``--out`` CSV goes, which positional names
the model, and loading the model a command runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def csv_out(value: str, name: str) -> Path:
    """The CSV file an ``--out`` names: ``value`` itself, or ``value/name`` when it is a
    folder (an existing one, or a path ending in a separator), so a folder given where a file
    is asked for gets the file inside it rather than failing after the work is done."""
    import os

    path = Path(value)
    if path.is_dir() or value.endswith(("/", os.sep)):
        return path / name
    return path


_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".onnx")


def names_a_checkpoint(arg: str) -> bool:
    """Whether a first positional of `bcd predict` is the model rather than an image: a URL,
    a .pt/.pth/.onnx file, or a registered trained model's name that is no existing path."""
    import urllib.parse

    from ..pretrained import is_trained_name

    if arg.startswith(("http://", "https://")):
        return True
    if urllib.parse.urldefrag(arg)[0].lower().endswith(_CHECKPOINT_SUFFIXES):
        return True
    return not Path(arg).exists() and is_trained_name(arg)


def model_then_inputs(args: argparse.Namespace, what: str, collect, suffixes) -> list[Path]:
    """`bcd predict/slide [MODEL] PATH...`: moves a first positional that names a model into
    ``args.checkpoint`` (see :func:`names_a_checkpoint`), checks the model choice
    (:func:`model_choice`), and returns the input files ``collect(paths)`` finds.

    Raises:
        UserError: no inputs after the model, both a model and --model, or no files.
    """
    from ..errors import UserError

    args.checkpoint = None
    if getattr(args, "samples", False):
        from ..pretrained import SAMPLE_PATCHES, SAMPLES_MODEL

        if not args.model and not any(names_a_checkpoint(p) for p in args.paths):
            args.model = SAMPLES_MODEL
            print(f"--samples: the six PatchCamelyon patches (96 px, CC0) in "
                  f"{SAMPLE_PATCHES}, scored with {SAMPLES_MODEL}, the model made for them.",
                  file=sys.stderr)
        args.paths = [*args.paths, str(SAMPLE_PATCHES)]
    if not args.paths:
        raise UserError(f"name the {what} files or folders (or --samples for the sample "
                        "patches that ship with the package).")
    if not args.model and names_a_checkpoint(args.paths[0]):
        args.checkpoint, args.paths = args.paths[0], args.paths[1:]
        if not args.paths:
            raise UserError(f"{args.checkpoint} is a model; name the {what} files or "
                            "folders after it.")
    elif args.model and any(names_a_checkpoint(p) for p in args.paths):
        raise UserError(f"--model {args.model} was given, and also a checkpoint among the "
                        f"{what}s; keep one of them.")
    model_choice(args)
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing and len(missing) == len(args.paths):  # before the model loads
        raise UserError(f"no such file or folder: {', '.join(missing)}.")
    files = collect(args.paths)
    if not files:
        raise UserError(f"no {what} files ({', '.join(suffixes)}) under "
                        f"{', '.join(args.paths)}.")
    return files


def model_choice(args: argparse.Namespace) -> None:
    """Sets ``args.checkpoint`` (a path or URL) or ``args.model`` (a registry name; None for
    the default trained model), refusing both at once."""
    from ..errors import UserError
    from ..pretrained import is_trained_name

    if args.checkpoint and args.model:
        raise UserError(f"both a checkpoint ({args.checkpoint}) and --model {args.model} were "
                        "given; keep one of them.")
    if args.checkpoint and not Path(args.checkpoint).exists() and is_trained_name(
            args.checkpoint):
        args.checkpoint, args.model = None, args.checkpoint
    if args.checkpoint is None and args.sha256:
        raise UserError("--sha256 checks a checkpoint file or URL; a trained model's hash is in "
                        "its registry entry (`bcd models --trained`): drop --sha256.")


def load_predictor(args: argparse.Namespace, *, slides: bool = False):
    """The model a door runs, with its intended use and not-for said on stderr."""
    from ..data.datasets import DEFAULT_MAX_PIXELS
    from ..inference import Predictor

    max_pixels = DEFAULT_MAX_PIXELS if args.max_pixels is None else (args.max_pixels or None)
    if args.checkpoint is None:
        from ..pretrained import list_trained, trained_model

        entry = trained_model(args.model, slides=slides)
        if args.model is None:
            others = ", ".join(m.name for m in list_trained() if m.name != entry.name)
            door = "whole slides" if slides else "images"
            print(f"Using the default trained model for {door}, {entry.name} ({entry.task}; "
                  f"{entry.scale}); pass a checkpoint or --model NAME for another"
                  + (f" ({others})" if others else "") + ".", file=sys.stderr)
        predictor = Predictor.from_pretrained(entry.name, device=args.device,
                                              progress=not args.quiet, max_pixels=max_pixels)
    else:
        predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device,
                                              sha256=args.sha256, progress=not args.quiet,
                                              max_pixels=max_pixels)
    if not getattr(args, "quiet", False):
        scope = predictor.scope()  # the model card's own words, as the page shows them
        print(f"Intended use: {scope['intended_use']}\nNot for: {scope['not_for']}",
              file=sys.stderr)
    return predictor

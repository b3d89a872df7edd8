"""The options that several `bcd` subcommands share, each written once, and the `bcd train`
flags generated from :class:`~breast_cancer_detection.config.TrainConfig` (its fields'
docstrings are their help), which `bcd cv` uses too."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

# Option factories, after TIAToolbox's `tiatoolbox/cli/common.py`: an option that several
# subcommands share is written once here; the arguments are only what differs between them.


def quiet(p: argparse.ArgumentParser, help: str = "no progress bar") -> None:
    """``--quiet``: no progress output; ``help`` says what it silences."""
    p.add_argument("--quiet", action="store_true", help=help)


def device(p: argparse.ArgumentParser) -> None:
    """``--device``: where the model runs (auto, cpu, cuda)."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")


def sha256(p: argparse.ArgumentParser, help: str = "expected SHA-256 of the checkpoint") -> None:
    """``--sha256``: the checksum a checkpoint file or URL must have."""
    p.add_argument("--sha256", help=help)


def backend(p: argparse.ArgumentParser) -> None:
    """``--backend``: which runtime scores (PyTorch, ONNX Runtime float32 or int8)."""
    from ..config import BACKEND_HELP, BACKENDS

    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help=f"{BACKEND_HELP[:-1]}. onnx: ONNX Runtime or an error; float32: ONNX "
                   "Runtime, never int8; torch: PyTorch (default: auto)")


def max_pixels(p: argparse.ArgumentParser) -> None:
    """``--max-pixels``: the largest image decoded."""
    p.add_argument("--max-pixels", type=int, metavar="N", help="refuse larger images before "
                   "decoding (default 100000000; 0: no limit of ours)")


def workers(p: argparse.ArgumentParser, default: int, help: str) -> None:
    """``--workers``: processes that read data, with this command's default."""
    p.add_argument("--workers", type=int, default=default, help=help)


def batch_size(p: argparse.ArgumentParser, default: int, help: str | None = None) -> None:
    """``--batch-size``: images per forward pass, with this command's default."""
    p.add_argument("--batch-size", type=int, default=default, help=help)


def seed(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--seed``: the random seed (default 0)."""
    p.add_argument("--seed", type=int, default=0, help=help)


def group_by(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--group-by``: what a patient is (BreakHis patient id or slide folder)."""
    p.add_argument("--group-by", choices=["patient", "slide"], default="patient", help=help)


def data_root(p: argparse.ArgumentParser) -> None:
    """``root``: the data folder, a positional."""
    p.add_argument("root", help="data folder (BreakHis tree or ImageFolder)")


def checkpoint(p: argparse.ArgumentParser, help: str, optional: bool = False) -> None:
    """``checkpoint``: the model file, a positional (optional where a default exists)."""
    p.add_argument("checkpoint", help=help, **({"nargs": "?"} if optional else {}))


def trained_model(p: argparse.ArgumentParser) -> None:
    """``--model``: a trained model by its registry name."""
    p.add_argument("--model", metavar="NAME", help="a trained model by name (`bcd models "
                   "--trained`; default: the one marked default there)")


def preset(p: argparse.ArgumentParser, help: str) -> None:
    """``--preset``: a bundled training preset or a YAML file."""
    p.add_argument("--preset", help=help)


def tta(p: argparse.ArgumentParser, help: str) -> None:
    """``--tta``: test-time augmentation over the 8 flips and quarter turns."""
    p.add_argument("--tta", action="store_true", help=help)


def bootstrap(p: argparse.ArgumentParser, help: str) -> None:
    """``--bootstrap``: patient-bootstrap resamples for confidence intervals."""
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help=help)


def target_sensitivity(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--target-sensitivity``: the sensitivity a threshold must reach."""
    p.add_argument("--target-sensitivity", type=float, metavar="S", help=help)


# Training settings on the command line: one flag per TrainConfig field, --FIELD-NAME, typed
# from the field's annotation, with the field's docstring as its help, so the two cannot drift.

# What a field's flag needs beyond that.
_TRAIN_FLAG_EXTRAS: dict[str, dict] = {
    "magnification": {"metavar": "MAG"},
    "group_by": {"choices": ["patient", "slide"]},
    "balance": {"choices": ["loss", "sampler", "patient", "none"]},
    "early_stop": {"metavar": "EPOCHS"},
    "amp": {"choices": ["auto", "bf16", "fp16", "off"]},
    "batch_augment": {"choices": ["auto", "on", "off"]},
    # A mapping: one KEY=VALUE per flag, merged into the preset's by train.train_settings.
    "augment": {"flags": ["--aug"], "action": "append", "metavar": "KEY=VALUE"},
}


def field_docstrings(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring: the string literal right below the field.

    Python keeps no such docstring at run time, so it is read from the class's source file.
    """
    import ast

    tree = ast.parse(Path(sys.modules[cls.__module__].__file__).read_text(encoding="utf-8"))
    body = next(node.body for node in tree.body
                if isinstance(node, ast.ClassDef) and node.name == cls.__name__)
    docs = {}
    for node, below in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(below, ast.Expr) and isinstance(below.value, ast.Constant)
                and isinstance(below.value.value, str)):
            docs[node.target.id] = below.value.value
    return docs


def plain_help(docstring: str) -> str:
    """A docstring as one line of terminal help: ``x`` and :role:`x` become `x`."""
    import re

    text = re.sub(r":\w+:`", "`", " ".join(docstring.split())).replace("``", "`")
    return text.replace("%", "%%")  # argparse %-formats help strings


@functools.cache
def train_flag_help() -> dict[str, str]:
    """The help of each TrainConfig field's flag: its docstring, then its default if it has one."""
    import re

    from ..config import TrainConfig

    docs = field_docstrings(TrainConfig)
    helps = {}
    for f in dataclasses.fields(TrainConfig):
        default = "" if f.default in (None, dataclasses.MISSING) else f" (default: {f.default})"
        text = plain_help(docs.get(f.name, ""))
        if _optional_value(f.name):  # the docstring's None is `none` on the command line
            text = re.sub(r"(^|\. )None\b|\bNone\b",
                          lambda m: f"{m[1]}Unset (or `none`)" if m[1] is not None
                          else "unset (or `none`)", text)
        helps[f.name] = (text + default).strip()
    return helps


def _field_kind(name: str) -> tuple[str, bool]:
    """A TrainConfig field's type as written (``int``, ``list[str]``...) and whether it may
    be None."""
    from ..config import TrainConfig

    kinds = [t.strip() for t in str(TrainConfig.__dataclass_fields__[name].type).split("|")]
    return next(k for k in kinds if k != "None"), "None" in kinds


def _optional_value(name: str) -> type | None:
    """The value type of a TrainConfig field that may be None (int, float or str), else None."""
    kind, optional = _field_kind(name)
    return {"int": int, "float": float, "str": str}.get(kind) if optional else None


def _none_or(kind: type):
    """An argparse type: ``none`` (any case) is None, anything else ``kind(text)``."""
    def parse(text: str):
        return None if text.strip().lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def train_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup, name: str,
               help: str | None = None) -> None:
    """Adds TrainConfig field ``name``'s flag; ``help`` replaces the docstring's where the
    setting means more to this subcommand."""
    kind, _ = _field_kind(name)
    if kind == "bool":
        kwargs: dict = {"action": argparse.BooleanOptionalAction}  # --x and --no-x
    elif kind.startswith("list["):
        kwargs = {"nargs": "+"}
    elif kind in ("int", "float"):
        kwargs = {"type": int if kind == "int" else float}
    else:
        kwargs = {}
    if (value := _optional_value(name)) is not None:  # `--early-crop none` unsets a preset's
        kwargs["type"] = _none_or(value)
    extras = dict(_TRAIN_FLAG_EXTRAS.get(name, {}))
    flags = extras.pop("flags", ["--" + name.replace("_", "-")])
    # SUPPRESS: only options actually given override the preset.
    p.add_argument(*flags, dest=name, default=argparse.SUPPRESS,
                   help=help or train_flag_help()[name], **kwargs, **extras)

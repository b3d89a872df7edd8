"""`bcd slide`: whole slides scored tile by tile: heat maps, regions, slide scores."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import common, options


def add_parser(sub) -> None:
    """`bcd slide`: its options."""
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
    options.trained_model(sl)
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
    options.tta(sl, "average the 8 flips and quarter turns of each tile (8x the time)")
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
    options.sha256(sl, "expected SHA-256 of the checkpoint")
    options.device(sl)
    options.backend(sl)
    options.batch_size(sl, 64, "tiles per forward pass (default 64)")
    options.workers(sl, None, "tile-reading processes (default: 0 on 2 cores or fewer, where "
                    "they only take time from the model; else 2)")
    options.quiet(sl, "no progress bars")
    sl.set_defaults(func=run, max_pixels=None)


def run(args: argparse.Namespace) -> int:
    """`bcd slide`: analyse the slides, one line each."""
    import math
    import os

    from ..errors import UserError
    from ..files import plural
    from ..slides import SLIDE_SUFFIXES, analyse_slides, collect_slides, parse_shard
    from ..slides.reader import positive_mpp

    slides = common.model_then_inputs(args, "slide", collect_slides, SLIDE_SUFFIXES)
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
    predictor = common.load_predictor(args, slides=True).on_backend(args.backend)
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


def _figure(value, spec: str) -> str:
    """A number for a summary line; n/a for NaN or None (a slide with no tissue tiles)."""
    import math

    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)

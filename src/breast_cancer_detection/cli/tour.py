"""`bcd notebook`, `bcd demo-slide`: the commands that show the tool without data of
one's own."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import options


def add_parsers(sub) -> None:
    """The commands that show the tool without data of one's own: the notebook run headless,
    and a demonstration slide."""
    add_notebook(sub)
    add_demo_slide(sub)


def add_notebook(sub) -> None:
    """`bcd notebook`: its options."""
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
    nb.set_defaults(func=run_notebook)


def run_notebook(args: argparse.Namespace) -> int:
    """`bcd notebook`: run the notebook, say where its copy is."""
    import ast
    import time

    from ..errors import UserError
    from ..notebook import pictures, quick_parameters
    from ..notebook import run_notebook as execute_notebook

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
        nb = execute_notebook(params, folder, out=out, timeout=args.timeout)
    except UserError:
        raise
    except Exception as e:  # a cell failed: nbclient's message holds the cell's traceback
        raise UserError(f"the notebook stopped at a failing cell; its outputs up to there are "
                        f"in {out}.\n{str(e)[-3000:]}") from None
    print(f"Notebook run in {time.perf_counter() - start:.0f} s, {pictures(nb)} pictures; "
          f"executed copy with all outputs: {out} (files in {folder})")
    return 0


def add_demo_slide(sub) -> None:
    """`bcd demo-slide`: its options."""
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
    options.seed(ds, "which patches go where (default 0)")
    ds.set_defaults(func=run_demo_slide)


def run_demo_slide(args: argparse.Namespace) -> int:
    """`bcd demo-slide`: write the slide, say what is in it."""
    from ..errors import UserError, install_hint
    from ..pretrained import SAMPLE_PATCHES
    from ..slides.make import demo_slide

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

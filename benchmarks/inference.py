#!/usr/bin/env python3
"""Inference speed on this CPU: Predictor against the seed notebook's predict(), same images.

    python benchmarks/inference.py [--images 48] [--batch-size 32] [--repeats 3]
                                   [--only breakhis|breakhis-model|pcam|jpeg]

1. BreakHis, DenseNet-121 (random weights, no download) at 224 px. The seed is timed by
   ``../shared/baseline/seed_pipeline.py predict`` (one image at a time, PIL + numpy) on a
   temporary folder holding the 22 BreakHis samples of ``../shared/data/breakhis-samples``
   cycled to N images; ours predicts the same files with each backend: PyTorch
   (channels-last, inference mode, batches), ONNX Runtime float32 (the export
   ``Predictor.on_backend`` makes), and the int8 model of ``bcd export --int8`` (calibrated
   and gated on the 22 samples with the probability rule: the weights are random, so there
   is no AUC to keep). All include reading and preparing the PNGs. The seed and our backends
   run interleaved, ``--repeats`` times; each repeat gives a ratio per backend, and the
   median and min-max of those ratios are printed.
2. ``--only breakhis-model``: the bundled BreakHis model (MobileNetV2, the default of ``bcd
   predict IMAGES``) on the same cycled BreakHis samples, PyTorch and ONNX Runtime float32,
   interleaved with the seed's DenseNet-121 predict(); ratios as in 1.
3. The bundled PCam model on 96 px patches (``../shared/data/pcam-subset/valid`` when
   present): ``Predictor.predict`` on N patches per backend (int8 gated on PCam valid), the
   model alone on a random batch of 64, and the share of this machine's float32 peak that the
   model alone reaches (its multiply-adds per image x images/s, against a 2048x2048 float32
   matrix product timed here).
4. Cold start: ``bcd predict CKPT one.png`` in a fresh process, time to the first prediction
   and peak resident memory.
5. JPEG (``--only jpeg``): the same DenseNet-121 on the BreakHis samples saved as JPEG
   (quality 90) at ``--jpeg-scale`` times their pixel size (default 2: 1400x920; bicubic), as
   a camera with more pixels gives them, each predicted whole as the seed does
   (``tile_factor=None``: by default images this large are cut into tiles at their own
   scale). The seed, ours on ONNX Runtime (a JPEG
   predicted whole is decoded at a reduced scale, never below the 256 px resize), and ours
   with the full decode (the reduction switched off in this process), interleaved
   ``--repeats`` times.

Prints the CPU and its vector extensions first, then JSON lines; run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import PCAM, SEED, SHARED, cpu_info, emit  # noqa: E402

SAMPLES = SHARED / "data" / "breakhis-samples"


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": len(values)}


def rotated(preds: dict, r: int) -> list:
    """The backends in another order each repeat: one that runs right after another in the
    same process may share the cores with the other's threads still winding down."""
    items = list(preds.items())
    k = r % len(items)
    return items[k:] + items[:k]


def cycled_images(dest: Path, n: int) -> list[Path]:
    """N files in an ImageFolder (benign/, malignant/), the samples repeated in turn."""
    samples = sorted(SAMPLES.rglob("*.png"))
    if not samples:
        raise SystemExit(f"no sample images under {SAMPLES}")
    out = []
    for i in range(n):
        src = samples[i % len(samples)]
        cls = "malignant" if "/malignant/" in str(src) else "benign"
        dst = dest / cls / f"{i:04d}-{src.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        out.append(dst)
    # The seed reads ImageFolder order (class, then name); ours gets the same list.
    return sorted(out, key=lambda p: (p.parent.name, p.name))


def save_densenet_checkpoint(path: Path) -> Path:
    from breast_cancer_detection.checkpoint import save_checkpoint, untrained_checkpoint

    return save_checkpoint(untrained_checkpoint("densenet121"), path)


def time_predict(predictor, files: list[Path], batch_size: int, **kw) -> float:
    """Images per second of ``predictor.predict(files, **kw)``, after a short warm-up."""
    predictor.predict(files[:4], batch_size=4, **kw)  # allocator, oneDNN/ORT kernels
    start = time.perf_counter()
    out = predictor.predict(files, batch_size=batch_size, **kw)
    seconds = time.perf_counter() - start
    assert all(p.error is None for p in out), [p.error for p in out if p.error]
    return len(files) / seconds


def time_seed(folder: Path, images: int) -> float:
    run = subprocess.run([sys.executable, str(SEED), "predict", str(folder), "--images",
                          str(images)], capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])["images_per_s"]


# Linux carries a parent's peak RSS over into a child it forks (and through exec), so the
# child's ru_maxrss would report this script's own gigabytes. A tiny launcher process, which
# holds no model, starts the measured command and reports that child's rusage.
_LAUNCHER = (
    "import json, os, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(proc.pid, 0)\n"
    "print(json.dumps({'seconds': time.perf_counter() - start, 'maxrss_kb': usage.ru_maxrss,\n"
    "                  'status': os.waitstatus_to_exitcode(status)}))\n"
)


def cold_start(checkpoint: Path, image: Path, out_csv: Path, backend: str, cache: Path
               ) -> dict:
    """Wall time and peak RSS of a fresh ``bcd predict`` on one image (``$BCD_CACHE`` at
    ``cache``, where the ONNX export already is)."""
    cmd = [sys.executable, "-m", "breast_cancer_detection.cli", "predict", str(checkpoint),
           str(image), "--out", str(out_csv), "--quiet", "--backend", backend]
    run = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True,
                         text=True, env={**os.environ, "BCD_CACHE": str(cache)})
    result = json.loads(run.stdout.strip().splitlines()[-1]) if run.stdout.strip() else {}
    if result.get("status") != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr}")
    return emit({"what": "cold_start_bcd_predict", "model": checkpoint.name,
                 "backend": backend, "seconds": result["seconds"],
                 "peak_rss_mb": result["maxrss_kb"] / 1024})


def backends(ckpt: Path, cache: Path, *, calibration: Path, gate: Path,
             gate_images: int | None) -> dict:
    """PyTorch, ONNX Runtime float32 and (if it passes its gate) int8 predictors of ckpt."""
    from breast_cancer_detection.export import ExportError
    from breast_cancer_detection.inference import Predictor
    from breast_cancer_detection.quantize import export_int8

    torch_pred = Predictor.from_checkpoint(ckpt, device="cpu", progress=False)
    out = {"torch": torch_pred,
           "onnx": torch_pred.on_backend("float32", cache_dir=cache / "float32")}
    try:
        path, gate_result = export_int8(ckpt, cache / "int8.onnx", calibration=calibration,
                                        gate=gate, gate_images=gate_images,
                                        cache_dir=cache / "int8", progress=False)
        emit({"what": "int8_gate", "model": ckpt.name, "passed": True,
              "rule": gate_result.rule, "summary": gate_result.summary()})
        out["int8"] = Predictor.from_onnx(path)
    except ExportError as e:
        emit({"what": "int8_gate", "model": ckpt.name, "passed": False, "why": str(e)})
    return out


def model_flops(model: torch.nn.Module, size: int) -> float:
    """Multiply-adds x 2 of one forward pass on one image (convolutions and linear layers)."""
    total = 0.0

    def conv(m, inputs, output):
        nonlocal total
        k = m.weight[0].numel()  # in_channels / groups x kh x kw
        total += 2.0 * k * output.numel()

    def linear(m, inputs, output):
        nonlocal total
        total += 2.0 * m.in_features * output.numel()

    hooks = [m.register_forward_hook(conv if isinstance(m, torch.nn.Conv2d) else linear)
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.inference_mode():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return total


def peak_gflops(seconds: float = 2.0) -> float:
    """float32 GFLOP/s of a 2048x2048 matrix product on this machine's threads."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return n * 2 * 2048**3 / (time.perf_counter() - start) / 1e9


def model_only(predictor, size: int, batch: int = 64, rounds: int = 10) -> float:
    x = torch.randn(batch, 3, size, size)
    predictor.probabilities(x, batch_size=batch)
    start = time.perf_counter()
    for _ in range(rounds):
        predictor.probabilities(x, batch_size=batch)
    return batch * rounds / (time.perf_counter() - start)


def breakhis(tmp: Path, args) -> None:
    files = cycled_images(tmp / "images", args.images)
    ckpt = save_densenet_checkpoint(tmp / "densenet121.pt")
    # The samples under plain names: no labels, so the int8 gate uses the probability rule
    # (random weights have no AUC to keep).
    flat = tmp / "unlabelled"
    flat.mkdir()
    for i, f in enumerate(sorted(SAMPLES.rglob("*.png"))):
        shutil.copyfile(f, flat / f"{i:03d}.png")
    preds = backends(ckpt, tmp / "cache-densenet", calibration=flat, gate=flat,
                     gate_images=None)
    gc.collect()  # the quantizer's calibration sessions, whose threads may still spin
    ratios: dict[str, list[float]] = {k: [] for k in preds}
    for r in range(args.repeats):
        seed = emit({"what": "seed_predict", "repeat": r,
                     "images_per_s": time_seed(tmp / "images", args.images)})
        for name, pred in rotated(preds, r):
            ips = time_predict(pred, files, args.batch_size)
            emit({"what": "bcd_predict", "repeat": r, "backend": name,
                  "note": pred.backend_note, "images_per_s": ips})
            ratios[name].append(ips / seed["images_per_s"])
    for name, values in ratios.items():
        emit({"what": "ratio_over_seed", "model": "densenet121 224 px", "backend": name,
              **spread(values), "target": 5.0, "met": statistics.median(values) >= 5.0})
    for backend in ("torch", "auto"):
        cold_start(ckpt, files[0], tmp / "one.csv", backend, tmp / "cache-densenet" / "float32")


def breakhis_model(tmp: Path, args) -> None:
    """The bundled BreakHis model (``bcd predict IMAGES`` with no model: its default) against
    the seed's DenseNet-121 predict(), on the same cycled BreakHis samples, interleaved."""
    from breast_cancer_detection.inference import Predictor
    from breast_cancer_detection.scope import BREAKHIS_MODEL

    folder = tmp / "images"
    files = (sorted(folder.rglob("*.png"), key=lambda p: (p.parent.name, p.name))
             if folder.is_dir() else cycled_images(folder, args.images))
    torch_pred = Predictor.from_pretrained(BREAKHIS_MODEL, device="cpu", progress=False)
    preds = {"torch": torch_pred,
             "onnx": torch_pred.on_backend("float32", cache_dir=tmp / "cache-breakhis")}
    ratios: dict[str, list[float]] = {k: [] for k in preds}
    for r in range(args.repeats):
        seed = emit({"what": "seed_predict", "repeat": r,
                     "images_per_s": time_seed(folder, args.images)})
        for name, pred in rotated(preds, r):
            ips = time_predict(pred, files, args.batch_size)
            emit({"what": "bcd_predict", "model": BREAKHIS_MODEL, "repeat": r,
                  "backend": name, "note": pred.backend_note, "images_per_s": ips})
            ratios[name].append(ips / seed["images_per_s"])
    for name, values in ratios.items():
        emit({"what": "ratio_over_seed", "model": f"{BREAKHIS_MODEL} vs seed densenet121",
              "backend": name, **spread(values)})


def pcam(tmp: Path, args) -> None:
    from breast_cancer_detection.inference import collect_images
    from breast_cancer_detection.pretrained import resolve_trained

    valid = PCAM / "valid"
    if not valid.is_dir():
        emit({"what": "pcam", "skipped": f"no {valid}"})
        return
    every = collect_images([valid])
    files = every[:: max(1, len(every) // args.patches)][: args.patches]
    preds = backends(resolve_trained("pcam-patch-cnn"), tmp / "cache-pcam",
                     calibration=PCAM / "train", gate=valid, gate_images=None)
    gc.collect()  # the quantizer's calibration sessions, whose threads may still spin
    flops = model_flops(preds["torch"].model.float(), 96)
    for r in range(args.repeats):
        peak = emit({"what": "machine_peak", "repeat": r, "gflops_float32": peak_gflops(),
                     "how": "2048x2048 float32 matmul, torch threads"})["gflops_float32"]
        for name, pred in rotated(preds, r):
            alone = model_only(pred, 96)
            emit({"what": "pcam_patch_cnn", "repeat": r, "backend": name,
                  "note": pred.backend_note, "predict_images_per_s":
                  time_predict(pred, files, 64), "model_alone_images_per_s": alone,
                  "model_gflops": alone * flops / 1e9,
                  "share_of_float32_peak": alone * flops / 1e9 / peak})


def jpeg(tmp: Path, args) -> None:
    from PIL import Image

    import breast_cancer_detection.inference.prepare as inference
    from breast_cancer_detection.inference import Predictor

    files = []
    for src in cycled_images(tmp / "png", args.images):
        dst = tmp / "jpeg" / src.parent.name / (src.stem + ".jpg")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src) as im:
            big = im.convert("RGB").resize((im.width * args.jpeg_scale,
                                            im.height * args.jpeg_scale),
                                           Image.Resampling.BICUBIC)
        big.save(dst, quality=90)
        files.append(dst)
    ckpt = tmp / "densenet121.pt"
    if not ckpt.exists():
        save_densenet_checkpoint(ckpt)
    pred = Predictor.from_checkpoint(ckpt, device="cpu", progress=False).on_backend(
        "onnx", cache_dir=tmp / "cache-densenet" / "float32")
    real = inference.open_rgb

    def full_decode(*a, reduced=None, **k):
        return real(*a, **k)

    ratios: dict[str, list[float]] = {"reduced": [], "full": [], "reduced_over_full": []}
    for r in range(args.repeats):
        seed = emit({"what": "seed_predict_jpeg", "repeat": r, "images_per_s":
                     time_seed(tmp / "jpeg", args.images)})["images_per_s"]
        got = {}
        for name in (("reduced", "full") if r % 2 == 0 else ("full", "reduced")):
            inference.open_rgb = full_decode if name == "full" else real
            try:
                got[name] = emit({"what": "bcd_predict_jpeg", "repeat": r, "decode": name,
                                  "backend": pred.backend, "images_per_s":
                                  time_predict(pred, files, args.batch_size,
                                               tile_factor=None)})["images_per_s"]
            finally:
                inference.open_rgb = real
            ratios[name].append(got[name] / seed)
        ratios["reduced_over_full"].append(got["reduced"] / got["full"])
    for name, values in ratios.items():
        emit({"what": "ratio_jpeg", "model": "densenet121 224 px",
              "jpeg": f"{700 * args.jpeg_scale}x{460 * args.jpeg_scale}",
              "ratio": name if name == "reduced_over_full" else f"{name} decode over seed",
              **spread(values)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48, help="BreakHis images per timed run "
                    "(default 48)")
    ap.add_argument("--batch-size", type=int, default=32, help="our batch size for BreakHis "
                    "(default 32)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    ap.add_argument("--patches", type=int, default=512, help="PCam patches per timed run "
                    "(default 512)")
    ap.add_argument("--jpeg-scale", type=int, default=2, help="the JPEGs' size in BreakHis "
                    "sizes (default 2: 1400x920; 4: 2800x1840, a 5 MP camera)")
    ap.add_argument("--only", choices=["breakhis", "breakhis-model", "pcam", "jpeg"],
                    help="run one part")
    args = ap.parse_args()

    emit({"what": "machine", **cpu_info(), "torch_threads": torch.get_num_threads(),
          "torch": torch.__version__, "load_average": list(os.getloadavg())})
    with tempfile.TemporaryDirectory(prefix="bcd-bench-") as tmp:
        tmp = Path(tmp)
        if args.only in (None, "breakhis"):
            breakhis(tmp, args)
        if args.only in (None, "breakhis-model"):
            breakhis_model(tmp, args)
        if args.only in (None, "pcam"):
            pcam(tmp, args)
        if args.only in (None, "jpeg"):
            jpeg(tmp, args)


if __name__ == "__main__":
    main()

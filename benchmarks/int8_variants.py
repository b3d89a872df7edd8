#!/usr/bin/env python3
"""Which int8 quantization keeps a checkpoint's answers: the accuracy gate under several settings.

``bcd export --int8`` quantizes with one set of ONNX Runtime settings (QDQ, per-channel int8
weights, uint8 activations calibrated by min-max on 256 training images, the first and last
weighted layers float32) and keeps the model only if it passes the gate
(``bcd.quantize``). This script runs that same export and gate for each variant below and
prints the gate's figures, writing nothing to keep (the models go to a temporary folder):

    python benchmarks/int8_variants.py CHECKPOINT [--calibration DIR] [--gate DIR]
                                       [--only NAME,NAME]

Defaults: the PCam folders of ``../shared/data/pcam-subset`` (train for calibration, valid for
the gate). On CPUs without VNNI (AVX2 only) ONNX Runtime's uint8 x int8 products can saturate
(``reduce_range`` and uint8 weights are the usual answers), so the figures depend on the CPU
class: the script prints the CPU first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import PCAM, cpu_info, emit  # noqa: E402


def variants() -> dict[str, dict]:
    """Name -> export_int8 keyword arguments (``settings`` go to quantize_static)."""
    from onnxruntime.quantization import CalibrationMethod, QuantType

    percentile = {"calibrate_method": CalibrationMethod.Percentile}
    return {
        "default": {},
        "reduce_range": {"settings": {"reduce_range": True}},
        "uint8_weights": {"settings": {"weight_type": QuantType.QUInt8}},
        "percentile": {"settings": percentile},
        "uint8_weights_percentile": {"settings": {**percentile,
                                                  "weight_type": QuantType.QUInt8}},
        "calibration_1024": {"calibration_images": 1024},
        "all_layers": {"all_layers": True},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a .pt checkpoint (e.g. checkpoints/pcam-mobilenet-v2.pt)")
    ap.add_argument("--calibration", default=str(PCAM / "train"), help="training images")
    ap.add_argument("--gate", default=str(PCAM / "valid"), help="labelled held-out images")
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    args = ap.parse_args()

    from breast_cancer_detection.checkpoint import load_checkpoint
    from breast_cancer_detection.quantize import GateFailed, export_int8

    table = variants()
    names = args.only.split(",") if args.only else list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(table)}")
    emit({"what": "machine", **cpu_info()})
    ckpt = load_checkpoint(args.checkpoint)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bcd-int8-") as tmp:
        for name in names:
            t = time.perf_counter()
            try:
                _, gate = export_int8(ckpt, Path(tmp) / f"{name}.onnx",
                                      calibration=args.calibration, gate=args.gate,
                                      cache_dir=Path(tmp) / "cache", progress=False,
                                      **table[name])
            except GateFailed as e:
                gate = e.gate
            rows.append(emit({"what": "variant", "name": name, "passed": gate.passed,
                              "auc_float32": gate.auc_float32, "auc_int8": gate.auc_int8,
                              "same_label": gate.same_label, "max_abs_diff": gate.max_abs_diff,
                              "mean_abs_diff": gate.mean_abs_diff, "images": gate.images,
                              "seconds": time.perf_counter() - t}))
    print(f"\n{'variant':26} {'passed':>6} {'AUC f32':>8} {'AUC int8':>8} {'same label':>10} "
          f"{'max |dP|':>8} {'mean |dP|':>9}")
    for r in rows:
        auc = (f"{r['auc_float32']:8.4f} {r['auc_int8']:8.4f}" if r["auc_int8"] is not None
               else f"{'-':>8} {'-':>8}")
        print(f"{r['name']:26} {str(r['passed']):>6} {auc} {r['same_label']:10.1%} "
              f"{r['max_abs_diff']:8.3f} {r['mean_abs_diff']:9.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

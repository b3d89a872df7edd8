"""`bcd export`: a checkpoint as ONNX, float32 or int8 behind its accuracy gate."""

from __future__ import annotations

import argparse

from . import options


def add_parser(sub) -> None:
    """`bcd export`: its options."""
    x = sub.add_parser("export", help="export a checkpoint to ONNX",
                       description="Write the checkpoint's model as ONNX (dynamic batch size) "
                       "with its preprocessing, classes and threshold as metadata, and check it "
                       "against PyTorch with ONNX Runtime (pip install onnx onnxruntime).")
    options.checkpoint(x, "best.pt from `bcd train` (or a URL of one)")
    x.add_argument("--onnx", required=True, metavar="PATH", help="the .onnx file to write")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    options.sha256(x)
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
    options.quiet(x, "no progress bars")
    x.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`bcd export`: write the ONNX model and say how it checked out."""
    from ..errors import UserError
    from ..export import export_onnx
    from ..hub import local_file

    if args.embed and "://" in str(args.checkpoint):
        raise UserError("--embed rewrites the checkpoint file: download it first and give "
                        "its local path.")
    ckpt = local_file(args.checkpoint, sha256=args.sha256, cache=None, progress=not args.quiet)
    if args.int8:
        from ..quantize import export_int8

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
            from ..quantize import embed_int8

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

#!/usr/bin/env python3
"""Training images/s on a GPU: our pipeline against the seed notebook's, same card, same run.

Both train DenseNet-121 at 224 px, batch 64, from the same full-size BreakHis PNGs (cycled
to --samples); weights are random since only speed is measured. Ours fine-tunes the whole
network with AMP and channels_last through `bcd`'s own loader and `train_one_epoch`; the seed
(../shared/baseline/seed_pipeline.py train) trains its frozen-backbone head in fp32, as the
original notebook did. Prints one JSON line per measurement and the ratio.

    python benchmarks/gpu_train.py [--data ../shared/data/breakhis-samples] [--batches 30]

Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"


def _cycled_table(root: Path, samples: int):
    import pandas as pd

    from breast_cancer_detection.data.breakhis import build_index

    index = build_index(root)
    reps = -(-samples // len(index))
    return pd.concat([index] * reps, ignore_index=True).iloc[:samples]


def measure_ours(root: Path, args) -> dict:
    from torch import nn

    from breast_cancer_detection.data.datasets import (
        EpochSampler,
        ImageTableDataset,
        collate_skip_bad,
    )
    from breast_cancer_detection.data.transforms import (
        Augmentation,
        Preprocessing,
        build_train_transform,
    )
    from breast_cancer_detection.engine import EpochState, amp_dtype, train_one_epoch
    from breast_cancer_detection.models import create_model

    device = torch.device("cuda")
    table = _cycled_table(root, args.samples)
    pre = Preprocessing(size=224, resize=256)
    ds = ImageTableDataset(root, table, build_train_transform(pre=pre, aug=Augmentation()))
    loader = torch.utils.data.DataLoader(
        ds, batch_size=args.batch_size, sampler=EpochSampler(len(ds), seed=0, epoch=0),
        num_workers=args.workers, collate_fn=collate_skip_bad, pin_memory=True, drop_last=True,
        prefetch_factor=4, persistent_workers=True)
    model = create_model("densenet121").to(device).to(memory_format=torch.channels_last)
    if args.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    dtype = amp_dtype("auto", device)
    loss_fn = nn.CrossEntropyLoss()
    kw = dict(dtype=dtype, channels_last=True, log_every=10**9)

    def run(n: int) -> EpochState:
        batches = itertools.islice(itertools.cycle(loader), n)
        return train_one_epoch(model, batches, opt, sched, loss_fn, device, **kw)

    run(args.warmup)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    state = run(args.batches)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0

    # The same step on tensors already on the GPU: the ceiling a loader could reach.
    x = torch.randn(args.batch_size, 3, 224, 224, device=device)
    y = torch.randint(0, 2, (args.batch_size,), device=device)
    synthetic = [{"x": x, "y": y, "bad": []}] * args.batches
    train_one_epoch(model, synthetic[: args.warmup], opt, sched, loss_fn, device, **kw)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    train_one_epoch(model, synthetic, opt, sched, loss_fn, device, **kw)
    torch.cuda.synchronize()
    ds_dt = time.perf_counter() - t1
    return {"what": "bcd_train_step", "device": torch.cuda.get_device_name(0),
            "amp": str(dtype).removeprefix("torch."), "workers": args.workers,
            "images": state.seen, "seconds": dt, "images_per_s": state.seen / dt,
            "gpu_only_images_per_s": args.batches * args.batch_size / ds_dt}


def measure_seed(root: Path, args) -> dict:
    cmd = [sys.executable, str(SHARED / "baseline" / "seed_pipeline.py"), "train", str(root),
           "--batches", str(args.batches), "--workers", str(args.workers), "--device", "cuda"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "breakhis-samples")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA GPU here: nothing to measure. Run this on a machine with one.")
        return 0
    if not args.data.is_dir():
        print(f"{args.data}: no such folder; pass --data with BreakHis PNGs.")
        return 2
    ours = measure_ours(args.data, args)
    print(json.dumps(ours))
    seed = measure_seed(args.data, args)
    print(json.dumps(seed))
    print(json.dumps({"what": "ratio", "ours_over_seed": ours["images_per_s"]
                      / seed["images_per_s"], "card": ours["device"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

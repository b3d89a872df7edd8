#!/usr/bin/env python3
"""Training-loader images/s with augmentation: our pipelines against the seed's, same run.

Every pipeline reads the same full-size BreakHis PNGs (the 22 real samples, linked over and
over into a temporary ``benign/`` + ``malignant/`` folder of ``--samples`` entries), uses 2
DataLoader workers and batches of 32, and delivers augmented 224 px training batches. Images
are counted after one warm-up batch, as the seed's own benchmark does.

- ``seed``: ``../shared/baseline/seed_pipeline.py loader`` (ImageFolder, PIL RandomRotation +
  RandomResizedCrop + flip), run before and after ours; the faster run is the yardstick.
- ``ours_files_pil``: PNG decode + ``build_train_transform`` in the workers
  (``ImageTableDataset``).
- ``ours_cache_pil``: the prepared cache (``bcd prepare --size 256``) + the same transform.
- ``ours_cache_batch``: the cache served as uint8, ``BatchAugment`` on whole batches in the
  main process: on the CPU with ``--device cpu`` (the default; one torch thread so it does not
  fight the two workers for two cores), or with ``--device cuda`` on the GPU, each batch moved
  there from pinned memory, off the CPU's budget.
- ``ours_cache_batch_in_workers``: the same, but each worker runs ``BatchAugment`` on its own
  batch in its collate function: the CPU-only arrangement of the batched path.

The one-time cache build is reported on its own line. On a shared machine wall-clock rates
swing with other people's load, so each pipeline's CPU cost per image is also measured on one
thread with ``time.process_time`` (which does not count time spent waiting for a core): its
inverse is the images/s one dedicated core sustains. The ``uint8_feed_only`` cost is what the
CPU still does per image when ``BatchAugment`` runs on a GPU (fetch + collate, no
augmentation); it is reported apart, not ranked against augmented pipelines. With
``--device cuda`` the ``ours_cache_batch`` cost row is instead the CPU's share of the GPU
pipeline: fetch, collate, copy to the device and launching ``BatchAugment`` there. Prints JSON
lines, then the ratios.

    python benchmarks/loader.py [--data ../shared/data/breakhis-samples] [--batches 60]
                                [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"


def make_cycled_folder(src: Path, dest: Path, samples: int) -> int:
    """Links the PNGs under ``src`` into ``dest/{benign,malignant}`` until there are ``samples``.

    Returns:
        How many distinct source images were cycled.
    """
    pngs = sorted(src.rglob("*.png"))
    if not pngs:
        raise SystemExit(f"{src}: no PNGs found; pass --data with BreakHis images.")
    for k, p in zip(range(samples), itertools.cycle(pngs)):
        cls = "malignant" if "malignant" in p.parts else "benign"
        link = dest / cls / f"{k:05d}_{p.name}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(p.resolve())
    return len(pngs)


class _AugmentingCollate:
    """collate_skip_bad, then BatchAugment on the batch, inside the DataLoader worker."""

    def __init__(self, batch_aug):
        self.batch_aug = batch_aug

    def __call__(self, items: list) -> dict:
        from breast_cancer_detection.data.datasets import collate_skip_bad

        batch = collate_skip_bad(items)
        batch["x"] = self.batch_aug(batch["x"])
        return batch


def _time_loader(loader, batches: int, on_batch=None, sync=None) -> tuple[int, float]:
    """Images delivered (and augmented, with ``on_batch``) per second after one warm-up batch.

    ``sync`` waits for work still queued on a device, so the clock stops when it is done.
    """
    it = iter(loader)
    first = next(it)  # warm-up: worker start
    if on_batch is not None:
        on_batch(first)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        x = on_batch(batch) if on_batch is not None else batch["x"]
        n += x.shape[0]
    if sync is not None:
        sync()
    return n, time.perf_counter() - t0


def _result(what: str, n: int, dt: float, **extra) -> dict:
    return {"what": what, "images": n, "seconds": round(dt, 3),
            "images_per_s": round(n / dt, 1), **extra}


def measure_ours(root: Path, args) -> list[dict]:
    from breast_cancer_detection.data.batch_augment import BatchAugment
    from breast_cancer_detection.data.breakhis import build_index
    from breast_cancer_detection.data.cache import (
        CachedImageDataset,
        open_cache,
        prepare_cache,
    )
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

    index = build_index(root)
    pre, aug = Preprocessing(size=224, resize=256), Augmentation()
    train_tf = build_train_transform(pre=pre, aug=aug)

    def loader(ds, pin_memory=False):
        return torch.utils.data.DataLoader(
            ds, batch_size=args.batch_size, sampler=EpochSampler(len(ds), seed=0, epoch=0),
            num_workers=args.workers, collate_fn=collate_skip_bad, pin_memory=pin_memory)

    results = []
    n, dt = _time_loader(loader(ImageTableDataset(root, index, train_tf)), args.batches)
    results.append(_result("ours_files_pil", n, dt, workers=args.workers))

    out = Path(args.tmp) / "cache"
    t0 = time.perf_counter()
    prepare_cache(root, index, args.cache_size, out, progress=False, workers=args.workers)
    build = time.perf_counter() - t0
    cache = open_cache(out, root, index)
    results.append({"what": "cache_build_once", "images": len(index), "seconds": round(build, 2),
                    "images_per_s": round(len(index) / build, 1), "shape": list(cache.shape),
                    "megabytes": round((out / "images.npy").stat().st_size / 1e6)})

    n, dt = _time_loader(loader(CachedImageDataset(cache, index, train_tf)), args.batches)
    results.append(_result("ours_cache_pil", n, dt, workers=args.workers))

    batch_aug = BatchAugment(pre=pre, aug=aug)
    augment_s = [0.0]
    on_gpu = args.device == "cuda"
    sync = torch.cuda.synchronize if on_gpu else None

    def augment(batch):
        t = time.perf_counter()
        x = batch_aug(batch["x"].to(args.device, non_blocking=True))
        augment_s[0] += time.perf_counter() - t  # on a GPU: launching it, not running it
        assert x.shape[1:] == (3, 224, 224) and x.dtype == torch.float32
        return x

    ds = CachedImageDataset(cache, index, as_uint8=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n, dt = _time_loader(loader(ds, pin_memory=on_gpu), args.batches, augment, sync)
    finally:
        torch.set_num_threads(threads)
    results.append(_result("ours_cache_batch", n, dt, workers=args.workers, device=args.device,
                           main_batch_augment_s=round(augment_s[0], 3), main_torch_threads=1))

    in_workers = torch.utils.data.DataLoader(
        ds, batch_size=args.batch_size, sampler=EpochSampler(len(ds), seed=0, epoch=0),
        num_workers=args.workers, collate_fn=_AugmentingCollate(batch_aug))

    def check(batch):
        assert batch["x"].shape[1:] == (3, 224, 224) and batch["x"].dtype == torch.float32
        return batch["x"]

    n, dt = _time_loader(in_workers, args.batches, check)
    results.append(_result("ours_cache_batch_in_workers", n, dt, workers=args.workers))
    return results


def _load_seed_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("seed_pipeline",
                                                  SHARED / "baseline" / "seed_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_cpu_cost(root: Path, args) -> list[dict]:
    """CPU milliseconds per augmented 224 px training image, on one thread, per pipeline."""
    from breast_cancer_detection.data.batch_augment import BatchAugment
    from breast_cancer_detection.data.breakhis import build_index
    from breast_cancer_detection.data.cache import CachedImageDataset, open_cache
    from breast_cancer_detection.data.datasets import ImageTableDataset, collate_skip_bad
    from breast_cancer_detection.data.transforms import (
        Augmentation,
        Preprocessing,
        build_train_transform,
    )

    index = build_index(root)
    cache = open_cache(Path(args.tmp) / "cache", root, index)
    pre, aug = Preprocessing(size=224, resize=256), Augmentation()
    tf = build_train_transform(pre=pre, aug=aug)
    seed_ds = _load_seed_module().make_dataset(str(root), train=True)
    n = args.cpu_images - args.cpu_images % args.batch_size or args.batch_size

    def per_image(ds, keys) -> float:
        ds[keys[0]]  # warm-up
        t = time.process_time()
        for k in keys:
            ds[k]
        return (time.process_time() - t) / len(keys) * 1e3

    uint8_ds = CachedImageDataset(cache, index, as_uint8=True)
    batch_aug = BatchAugment(pre=pre, aug=aug)

    def batched() -> float:
        # On a GPU: the CPU time to fetch, collate, copy over and launch the augmentation.
        batch_aug(collate_skip_bad([uint8_ds[i] for i in range(args.batch_size)])["x"]
                  .to(args.device))
        if args.device == "cuda":
            torch.cuda.synchronize()
        t = time.process_time()
        for start in range(0, n, args.batch_size):
            batch = collate_skip_bad([uint8_ds[i] for i in range(start, start + args.batch_size)])
            batch_aug(batch["x"].to(args.device))
        if args.device == "cuda":
            torch.cuda.synchronize()
        return (time.process_time() - t) / n * 1e3

    def feed_only() -> float:
        # What the CPU still does per image when BatchAugment runs on a GPU: fetch and collate.
        t = time.process_time()
        for start in range(0, n, args.batch_size):
            collate_skip_bad([uint8_ds[i] for i in range(start, start + args.batch_size)])
        return (time.process_time() - t) / n * 1e3

    keys = [(i, 1000 + i) for i in range(n)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        costs = {
            "seed": per_image(seed_ds, list(range(n))),
            "ours_files_pil": per_image(ImageTableDataset(root, index, tf), keys),
            "ours_cache_pil": per_image(CachedImageDataset(cache, index, tf), keys),
            "ours_cache_batch": batched(),
        }
        feed = feed_only()
    finally:
        torch.set_num_threads(threads)
    rows = [{"what": f"cpu_cost_{k}", "images": n, "cpu_ms_per_image": round(v, 2),
             "images_per_s_per_core": round(1e3 / v, 1),
             **({"device": args.device} if k == "ours_cache_batch" else {})}
            for k, v in costs.items()]
    rows.append({"what": "cpu_cost_ours_cache_uint8_feed_only", "images": n,
                 "cpu_ms_per_image": round(feed, 3), "images_per_s_per_core": round(1e3 / feed),
                 "note": "no augmentation on the CPU: BatchAugment runs on the GPU in training; "
                 "not comparable with the augmented rows"})
    return rows


def measure_seed(root: Path, args, what: str) -> dict:
    cmd = [sys.executable, str(SHARED / "baseline" / "seed_pipeline.py"), "loader", str(root),
           "--batches", str(args.batches), "--workers", str(args.workers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["what"] = what
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "breakhis-samples")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batches", type=int, default=60, help="timed batches per pipeline")
    ap.add_argument("--batch-size", type=int, default=32, help="the seed's is 32")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache-size", type=int, default=256)
    ap.add_argument("--cpu-images", type=int, default=64,
                    help="images per pipeline for the one-thread CPU cost")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where ours_cache_batch runs BatchAugment")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here (torch.cuda.is_available() is False); "
              "run without it to measure BatchAugment on the CPU.")
        return 2
    if not args.data.is_dir():
        print(f"{args.data}: no such folder; pass --data with BreakHis PNGs.")
        return 2
    with tempfile.TemporaryDirectory(prefix="bcd-loader-") as tmp:
        args.tmp = tmp
        root = Path(tmp) / "images"
        distinct = make_cycled_folder(args.data, root, args.samples)
        print(json.dumps({"what": "setup", "samples": args.samples, "distinct_pngs": distinct,
                          "batches": args.batches, "batch_size": args.batch_size,
                          "workers": args.workers, "cpus": torch.multiprocessing.cpu_count(),
                          "device": args.device}))
        seeds = [measure_seed(root, args, "seed_loader")]
        print(json.dumps(seeds[0]), flush=True)
        ours = measure_ours(root, args)
        for r in ours:
            print(json.dumps(r), flush=True)
        seeds.append(measure_seed(root, args, "seed_loader_again"))
        print(json.dumps(seeds[1]), flush=True)
        costs = measure_cpu_cost(root, args)
        for r in costs:
            print(json.dumps(r), flush=True)
    seed = max(s["images_per_s"] for s in seeds)
    loaders = [r for r in ours if r["what"].startswith("ours_")]
    best = max(loaders, key=lambda r: r["images_per_s"])
    print(json.dumps({"what": "ratio", "seed_images_per_s": seed,
                      **{f"{r['what']}_over_seed": round(r["images_per_s"] / seed, 2)
                         for r in loaders},
                      "best": best["what"], "best_over_seed": round(best["images_per_s"] / seed, 2),
                      "target": 5.0}))
    seed_ms = costs[0]["cpu_ms_per_image"]
    augmented = [r for r in costs[1:] if "note" not in r]
    cheapest = min(augmented, key=lambda r: r["cpu_ms_per_image"])
    print(json.dumps({"what": "cpu_cost_ratio", "seed_cpu_ms_per_image": seed_ms,
                      **{f"{r['what'].removeprefix('cpu_cost_')}_speedup": round(
                          seed_ms / r["cpu_ms_per_image"], 2) for r in augmented},
                      "best": cheapest["what"].removeprefix("cpu_cost_"),
                      "best_speedup": round(seed_ms / cheapest["cpu_ms_per_image"], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

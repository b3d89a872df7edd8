#!/usr/bin/env python3
"""A bounded load test of `bcd serve` on 127.0.0.1: throughput, latency, errors, peak RSS.

    python benchmarks/load.py [--requests 500] [--concurrency 16] [--model densenet121]
                              [--backend auto|torch|onnx|float32]

Writes a randomly initialised checkpoint to a temporary folder (``densenet121``, the model
the project trains, or ``tiny``, the 2-block SmallCNN of the tests; both at 224 px crops of a
256 px resize, so a 700x460 BreakHis image is predicted whole; the tiny net is no faster at
that size, as its full-resolution first blocks cost as much as DenseNet), starts
``bcd serve`` on it in a subprocess on a free port of 127.0.0.1, and sends N requests, C at
a time, each posting one image of ``../shared/data/breakhis-samples`` (in turn; a synthetic
700x460 image when they are absent). Every answer includes the Grad-CAM overlay, so a
request is a scoring pass on the server's ``--backend`` (default ``auto``, as ``bcd serve``:
ONNX Runtime on a CPU when installed), a PyTorch forward and backward pass for Grad-CAM, and
the PNG work. The server's queue is
``--max-queue`` (default: the concurrency, so that no request is refused); a smaller one
shows the 503s the server answers instead of queueing. Prints one JSON line per result,
then a summary; stops the server and exits by itself. Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from breast_cancer_detection.config import BACKENDS

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "data" / "breakhis-samples"
HOST = "127.0.0.1"  # never anything else: the server has no authentication


def emit(record: dict) -> dict:
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                      for k, v in record.items()}), flush=True)
    return record


def save_checkpoint(arch: str, path: Path) -> Path:
    """A checkpoint with random weights (no download), as `bcd train` would write it."""

    from breast_cancer_detection.checkpoint import save_checkpoint, untrained_checkpoint

    return save_checkpoint(untrained_checkpoint(arch), path)


def images() -> list[tuple[str, bytes]]:
    """The BreakHis samples as (name, bytes), or one synthetic image of their size."""
    found = sorted(SAMPLES.rglob("*.png"))
    if found:
        return [(p.name, p.read_bytes()) for p in found]
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = np.clip(np.array([200, 140, 190]) + rng.integers(-40, 40, (460, 700, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return [("synthetic.png", buf.getvalue())]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def memory_kb(pid: int) -> dict[str, int]:
    """Resident and peak resident memory of a process (Linux /proc), in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def stop(proc: subprocess.Popen, timeout: float) -> None:
    """Stops the server: SIGTERM, then SIGKILL after ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float,
                  err: Path | None = None) -> dict:
    """The server's /api/health answer once it is up; its stderr (the pipe, or the file
    ``err``) if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = (err.read_text(errors="replace") if err is not None
                    else proc.stderr.read().decode(errors="replace"))
            raise SystemExit(f"the server exited with code {proc.returncode}:\n{text}")
        try:
            return httpx.get(f"{url}/api/health", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"the server did not answer at {url} within {timeout:.0f} s")


async def load(url: str, files: list[tuple[str, bytes]], n: int, concurrency: int,
               timeout: float, retry: bool) -> tuple[list[tuple[int, float]], float, int]:
    """Sends ``n`` requests, ``concurrency`` at a time.

    Returns:
        (final status, seconds from the first attempt) per request, the wall time, and how
        many 503 answers were retried (with ``retry``, after their Retry-After, as the page
        does).
    """
    results: list[tuple[int, float]] = []
    retried = 0
    counter = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal retried
        for i in counter:
            name, data = files[i % len(files)]
            start = time.perf_counter()
            while True:
                try:
                    r = await client.post(f"{url}/api/predict",
                                          files=[("files", (name, data, "image/png"))])
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1  # connection error or client timeout
                if status != 503 or not retry:
                    break
                retried += 1
                await asyncio.sleep(float(r.headers.get("Retry-After", 1)))
            results.append((status, time.perf_counter() - start))

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return results, seconds, retried


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=500, help="requests in all (default 500)")
    ap.add_argument("--concurrency", type=int, default=16,
                    help="requests in flight at once (default 16)")
    ap.add_argument("--model", choices=["densenet121", "tiny"], default="densenet121",
                    help="architecture of the random checkpoint (default densenet121)")
    ap.add_argument("--max-queue", type=int, help="the server's --max-queue (default: the "
                    "concurrency)")
    ap.add_argument("--max-concurrency", type=int, default=1,
                    help="the server's --max-concurrency (default 1)")
    ap.add_argument("--backend", choices=BACKENDS, default="auto",
                    help="the server's --backend: what scores the uploads (default auto)")
    ap.add_argument("--retry", action="store_true", help="clients wait Retry-After and resend "
                    "a request answered 503, as the page does (default: count it as an error)")
    ap.add_argument("--timeout", type=float, default=120,
                    help="seconds a client waits for one answer (default 120)")
    args = ap.parse_args()
    max_queue = args.concurrency if args.max_queue is None else args.max_queue
    files = images()

    with tempfile.TemporaryDirectory(prefix="bcd-load-") as tmp:
        ckpt = save_checkpoint(args.model, Path(tmp) / f"{args.model}.pt")
        port = free_port()
        url = f"http://{HOST}:{port}"
        cmd = [sys.executable, "-m", "breast_cancer_detection.cli", "serve", str(ckpt),
               "--host", HOST, "--port", str(port), "--device", "cpu", "--quiet",
               "--max-queue", str(max_queue), "--max-concurrency", str(args.max_concurrency),
               "--backend", args.backend]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            health = wait_until_up(url, proc, timeout=120)
            warm = httpx.post(f"{url}/api/predict", timeout=args.timeout,
                              files=[("files", (files[0][0], files[0][1], "image/png"))])
            if warm.status_code != 200:
                raise SystemExit(f"warm-up request failed: {warm.status_code} {warm.text}")
            idle = memory_kb(proc.pid)
            emit({"what": "server", "model": health["model"], "device": health["device"],
                  "backend": health["backend"],
                  "max_concurrency": health["max_concurrency"], "max_queue": health["max_queue"],
                  "cpus": os.cpu_count(), "images": len(files),
                  "rss_after_warmup_mb": idle["VmRSS"] / 1024})
            results, seconds, retried = asyncio.run(load(
                url, files, args.requests, args.concurrency, args.timeout, args.retry))
            mem = memory_kb(proc.pid)
            alive = proc.poll() is None and httpx.get(f"{url}/api/health").status_code == 200
        finally:
            stop(proc, 20)

    ok = np.array([s for status, s in results if status == 200])
    busy = sum(status == 503 for status, _ in results)
    errors = sum(status != 200 for status, _ in results)
    pct = np.percentile(ok, [50, 95, 99]) if len(ok) else [float("nan")] * 3
    summary = emit({
        "what": "load", "model": args.model, "requests": len(results),
        "concurrency": args.concurrency, "seconds": seconds,
        "throughput_per_s": len(ok) / seconds, "p50_s": float(pct[0]), "p95_s": float(pct[1]),
        "p99_s": float(pct[2]), "ok": len(ok), "errors": errors, "busy_503": busy,
        "other_errors": errors - busy, "retried_503": retried, "peak_rss_mb": mem["VmHWM"] / 1024,
        "server_alive_after": alive,
    })
    print(f"\n{summary['requests']} requests, {args.concurrency} concurrent, {args.model} at "
          f"224 px on {os.cpu_count()} CPUs: {summary['throughput_per_s']:.1f} answers/s; "
          f"latency p50 {pct[0]:.3f} s, p95 {pct[1]:.3f} s, p99 {pct[2]:.3f} s; "
          f"{errors} errors ({busy} of them 503 busy; {retried} 503s retried); server peak RSS "
          f"{summary['peak_rss_mb']:.0f} MB (after warm-up {idle['VmRSS'] / 1024:.0f} MB).")


if __name__ == "__main__":
    main()

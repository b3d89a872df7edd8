#!/usr/bin/env python3
"""A bounded soak test of `bcd serve` on 127.0.0.1: ordinary users among hostile clients.

    python benchmarks/soak.py [--seconds 120] [--model densenet121]

Writes a randomly initialised checkpoint to a temporary folder (as benchmarks/load.py does:
224 px crops of a 256 px resize), starts ``bcd serve`` on it in a subprocess on a free port
of 127.0.0.1 with its default limits, and for ``--seconds`` sends, all at once:

- ordinary requests: one BreakHis sample of ``../shared/data/breakhis-samples`` each, from
  ``--users`` clients in a loop; a 503 is retried after its Retry-After, as the page does;
- hostile ones: thin 1x40000 PNGs, 1-bit 10000x10000 PNGs (12 KB sent, 400 MB decoded), an
  EPS file, sockets that send headers and part of a body and then stall, and clients that
  disconnect mid-upload or while their image is being predicted;
- a GET /api/health every half second;
- with ``--slides N``: a ``bcd slide`` output folder of N listed slides served with
  ``--slides``, a GET /api/slides every 0.3 s while slides.csv gains a row every second and
  one slide's regions.geojson turns malformed, deeply nested or oversized in turn (every
  listing must answer 200, the bad slide with a note).

Then it stops the server and prints: ordinary requests answered (200, possibly after 503
retries) and their p50/p99 latency, the statuses the hostile requests got, the 5xx count
(from the clients and from the server's access log; must be 0), tracebacks on the server's
stderr (must be 0), the server's peak RSS, and the health latency (must stay under 1 s).
Exits 1 when one of those fails. Every request goes to 127.0.0.1; every count is bounded.
Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import (  # noqa: E402
    HOST,
    emit,
    free_port,
    images,
    memory_kb,
    save_checkpoint,
    stop,
    wait_until_up,
)

MAX_REQUESTS = 5000  # per kind of client: bounds the run even if the server answers at once
BOUNDARY = "soak"


def _png(mode: str, size: tuple[int, int], colour) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def hostile_files() -> dict[str, tuple[str, bytes, int]]:
    """Kind -> (file name, bytes, the status the server must answer)."""
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n"
           b"newpath 0 0 moveto 100 100 lineto stroke\nshowpage\n%%EOF\n")
    return {
        "thin_1x40000": ("thin.png", _png("RGB", (40_000, 1), (200, 100, 150)), 413),
        "one_bit_10000x10000": ("bomb.png", _png("1", (10_000, 10_000), 0), 413),
        "eps": ("figure.eps", eps, 415),
    }


def cpu_line() -> str:
    """The CPU model and whether it has AVX-512, from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    avx512 = sorted(set(re.findall(r"\b(avx512\w*)\b", info)))
    return (f"{model.group(1) if model else 'unknown CPU'}, {os.cpu_count()} CPUs, "
            f"AVX-512: {', '.join(avx512) if avx512 else 'no'}")


def _multipart(name: str, data: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; "
            f"filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def _head(port: int, length: int) -> bytes:
    return (f"POST /api/predict HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


class Soak:
    def __init__(self, url: str, port: int, seconds: float, samples, users: int,
                 stalled: int, slides: Path | None = None):
        self.url, self.port, self.users, self.stalled = url, port, users, stalled
        self.samples = samples
        self.end = time.monotonic() + seconds
        self.normal: list[tuple[int, float, int]] = []  # status, seconds, 503 retries
        self.hostile: Counter[str] = Counter()
        self.wrong: list[str] = []
        self.health: list[float] = []
        self.client_5xx = 0
        self.slides = slides
        self.listings: list[float] = []  # seconds per /api/slides answer (inf: not 200)

    def running(self) -> bool:
        return time.monotonic() < self.end

    def _seen(self, kind: str, status: int, expected: int | None = None) -> None:
        self.hostile[f"{kind} {status}"] += 1
        if status >= 500 and status != 503:
            self.client_5xx += 1
        if expected is not None and status != expected:
            self.wrong.append(f"{kind}: {status}, expected {expected}")

    async def user(self, client: httpx.AsyncClient, k: int) -> None:
        rng = np.random.default_rng(k)
        for _ in range(MAX_REQUESTS):
            if not self.running():
                return
            name, data = self.samples[rng.integers(len(self.samples))]
            start, retries = time.perf_counter(), 0
            while True:
                try:
                    r = await client.post("/api/predict",
                                          files=[("files", (name, data, "image/png"))])
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1
                if status != 503 or retries >= 10:
                    break
                retries += 1
                await asyncio.sleep(float(r.headers.get("Retry-After", 1)))
            if status >= 500 and status != 503:
                self.client_5xx += 1
            self.normal.append((status, time.perf_counter() - start, retries))

    async def bad_files(self, client: httpx.AsyncClient) -> None:
        files = hostile_files()
        for i in range(MAX_REQUESTS):
            if not self.running():
                return
            kind = list(files)[i % len(files)]
            name, data, expected = files[kind]
            try:
                r = await client.post("/api/predict", files=[("files", (name, data))])
                self._seen(kind, r.status_code, expected)
            except httpx.HTTPError as e:
                self._seen(kind, -1)
                self.wrong.append(f"{kind}: {type(e).__name__}")
            await asyncio.sleep(0.2)

    async def stall(self) -> None:
        """Keeps one socket that sends headers and a little body, then nothing, open."""
        for _ in range(MAX_REQUESTS):
            if not self.running():
                return
            reader, writer = await asyncio.open_connection(HOST, self.port)
            self.hostile["stalled_upload opened"] += 1
            body = _multipart("slow.png", self.samples[0][1])
            writer.write(_head(self.port, len(body)) + body[:200])
            await writer.drain()
            try:
                answer = await asyncio.wait_for(reader.read(4096),
                                                max(0.1, self.end - time.monotonic()))
                status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else -1
                self._seen("stalled_upload", status, 408)
            except TimeoutError:
                pass  # the soak ended first
            finally:
                writer.close()

    async def leave(self, k: int) -> None:
        """Clients that disconnect mid-upload, or while their image is being predicted."""
        body = _multipart(*self.samples[k % len(self.samples)])
        for i in range(MAX_REQUESTS):
            if not self.running():
                return
            reader, writer = await asyncio.open_connection(HOST, self.port)
            mid_upload = i % 2 == 0
            writer.write(_head(self.port, len(body)) + (body[:len(body) // 2] if mid_upload
                                                        else body))
            await writer.drain()
            await asyncio.sleep(0.3)
            writer.close()
            self.hostile["left_mid_upload" if mid_upload else "left_mid_work"] += 1
            await asyncio.sleep(0.7)

    async def poll(self, client: httpx.AsyncClient, path: str, seconds: list[float], *,
                   every: float, timeout: float) -> None:
        """GETs ``path`` every ``every`` s, appending each answer's seconds to ``seconds``
        (infinity when it is not a 200)."""
        for _ in range(MAX_REQUESTS):
            if not self.running():
                return
            start = time.perf_counter()
            try:
                r = await client.get(path, timeout=timeout)
                ok = r.status_code == 200
                if r.status_code >= 500 and r.status_code != 503:
                    self.client_5xx += 1
            except httpx.HTTPError:
                ok = False
            seconds.append(time.perf_counter() - start if ok else float("inf"))
            await asyncio.sleep(every)

    async def churn_slides(self) -> None:
        """slides.csv gains a row a second; slide 0's regions file goes bad in turn."""
        bad = [b'{"features": [{"properties": "x"}]}', b"[" * 100_000,
               b" " * (9 << 20), (self.slides / "s1" / "regions.geojson").read_bytes()]
        for i in range(MAX_REQUESTS):
            if not self.running():
                return
            (self.slides / "s0" / "regions.geojson").write_bytes(bad[i % len(bad)])
            with open(self.slides / "slides.csv", "a", encoding="utf-8") as f:
                f.write(f"/data/new{i}.svs,0.5,3,1,0.1,1.0,3.0,0.25,x,0,,new{i}\n")
            await asyncio.sleep(1.0)

    async def run(self) -> None:
        timeout = httpx.Timeout(300)
        async with (httpx.AsyncClient(base_url=self.url, timeout=timeout) as users,
                    httpx.AsyncClient(base_url=self.url, timeout=timeout) as hostile,
                    httpx.AsyncClient(base_url=self.url, timeout=timeout) as prober):
            await asyncio.gather(
                *(self.user(users, k) for k in range(self.users)),
                self.bad_files(hostile),
                self.poll(prober, "/api/health", self.health, every=0.5, timeout=10),
                *(self.stall() for _ in range(self.stalled)),
                *(self.leave(k) for k in range(2)),
                *((self.poll(prober, "/api/slides", self.listings, every=0.3, timeout=60),
                   self.churn_slides()) if self.slides else ()))


def slides_folder(root: Path, n: int) -> Path:
    """A ``bcd slide --out`` folder of ``n`` listed slides (tiny files; no scoring)."""
    from breast_cancer_detection.slides.run import COLUMNS

    png = _png("RGB", (64, 48), (200, 120, 180))
    region = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[0, 0], [1, 0], [1, 1], [0, 0]]]}, "properties": {"tiles": 1, "area_mm2": 0.1,
                                                          "max_p": 0.9}}
    rows = []
    for i in range(n):
        folder = root / f"s{i}"
        folder.mkdir(parents=True)
        for name in ("heatmap.png", "tissue.png", "top_tiles.png"):
            (folder / name).write_bytes(png)
        (folder / "tiles.csv").write_text("x,y,width,height,p_malignant\n0,0,1,1,0.5\n")
        (folder / "regions.geojson").write_text(json.dumps(
            {"type": "FeatureCollection", "features": [region] * 3}))
        rows.append(f"/data/s{i}.svs,0.5,3,1,0.1,1.0,3.0,0.25,x,0,,s{i}")
    (root / "slides.csv").write_text(",".join(COLUMNS) + "\n" + "\n".join(rows) + "\n")
    return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120,
                    help="how long the traffic lasts (default 120)")
    ap.add_argument("--model", choices=["densenet121", "tiny"], default="densenet121",
                    help="architecture of the random checkpoint (default densenet121)")
    ap.add_argument("--users", type=int, default=3,
                    help="ordinary clients sending one image at a time (default 3)")
    ap.add_argument("--stalled", type=int, default=12, help="sockets kept stalled mid-upload "
                    "at once (default 12, more than the default 1 slot + 8 queue places)")
    ap.add_argument("--slides", type=int, default=0, metavar="N", help="also serve a `bcd "
                    "slide` folder of N slides and list it while it changes (default 0: off)")
    args = ap.parse_args()
    samples = images()
    print(f"CPU: {cpu_line()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bcd-soak-") as tmp:
        ckpt = save_checkpoint(args.model, Path(tmp) / f"{args.model}.pt")
        port = free_port()
        url = f"http://{HOST}:{port}"
        out, err = Path(tmp) / "stdout.log", Path(tmp) / "stderr.log"
        cmd = [sys.executable, "-m", "breast_cancer_detection.cli", "serve", str(ckpt),
               "--host", HOST, "--port", str(port), "--device", "cpu"]
        slides = slides_folder(Path(tmp) / "slides", args.slides) if args.slides else None
        if slides is not None:
            cmd += ["--slides", str(slides)]
        with open(out, "wb") as fout, open(err, "wb") as ferr:
            proc = subprocess.Popen(cmd, stdout=fout, stderr=ferr)
            try:
                health = wait_until_up(url, proc, 180, err=err)
                warm = httpx.post(f"{url}/api/predict", timeout=300, files=[
                    ("files", (samples[0][0], samples[0][1], "image/png"))])
                if warm.status_code != 200:
                    raise SystemExit(f"warm-up failed: {warm.status_code} {warm.text}")
                idle_mb = memory_kb(proc.pid)["VmRSS"] / 1024
                soak = Soak(url, port, args.seconds, samples, args.users, args.stalled,
                            slides)
                start = time.perf_counter()
                asyncio.run(soak.run())
                seconds = time.perf_counter() - start
                peak_mb = memory_kb(proc.pid)["VmHWM"] / 1024
                alive = proc.poll() is None and httpx.get(f"{url}/api/health").status_code == 200
            finally:
                stop(proc, 30)
        access, errors = out.read_text(errors="replace"), err.read_text(errors="replace")

    logged_5xx = len(re.findall(r'HTTP/1\.1" 5\d\d', access + errors))
    tracebacks = errors.count("Traceback")
    left = len(re.findall(r"disconnected (during its upload|before its answer)", errors))
    ok = [s for status, s, _ in soak.normal if status == 200]
    failed = Counter(status for status, _, _ in soak.normal if status != 200)
    p50, p99 = np.percentile(ok, [50, 99]) if ok else (float("nan"),) * 2
    health_max = max(soak.health) if soak.health else float("inf")
    summary = emit({
        "what": "soak", "model": health["model"], "seconds": seconds,
        "normal_requests": len(soak.normal), "normal_ok": len(ok),
        "normal_ok_after_503": sum(1 for status, _, r in soak.normal if status == 200 and r),
        "normal_failed": dict(failed), "p50_s": float(p50), "p99_s": float(p99),
        "hostile": dict(sorted(soak.hostile.items())), "hostile_wrong_status": soak.wrong[:10],
        "client_5xx": soak.client_5xx, "logged_5xx": logged_5xx, "tracebacks": tracebacks,
        "disconnects_logged": left, "peak_rss_mb": peak_mb, "rss_after_warmup_mb": idle_mb,
        "health_probes": len(soak.health),
        "health_p50_s": float(np.median(soak.health)) if soak.health else float("nan"),
        "health_p99_s": float(np.percentile(soak.health, 99)) if soak.health else float("nan"),
        "health_max_s": health_max, "server_alive_after": alive, "cpu": cpu_line(),
        "slide_listings": len(soak.listings),
        "slide_listing_max_s": max(soak.listings) if soak.listings else None,
    })
    problems = [what for what, bad in [
        ("ordinary requests failed", bool(failed) or not ok),
        ("5xx answers", soak.client_5xx + logged_5xx > 0),
        ("tracebacks on the server's stderr", tracebacks > 0),
        ("hostile requests got an unexpected status", bool(soak.wrong)),
        ("/api/health took 1 s or more", health_max >= 1.0),
        ("/api/slides failed to answer 200", any(t == float("inf") for t in soak.listings)),
        ("the server died", not alive)] if bad]
    print(f"\n{args.seconds:.0f} s soak of {summary['model']} on {cpu_line()}: "
          f"{len(ok)}/{len(soak.normal)} ordinary requests answered 200 "
          f"({summary['normal_ok_after_503']} after 503 retries), p50 {p50:.2f} s, p99 "
          f"{p99:.2f} s; {sum(soak.hostile.values())} hostile requests; 5xx: "
          f"{soak.client_5xx} seen, {logged_5xx} logged; tracebacks: {tracebacks}; server "
          f"peak RSS {peak_mb:.0f} MB (after warm-up {idle_mb:.0f} MB); /api/health max "
          f"{health_max * 1000:.0f} ms over {len(soak.health)} probes"
          + (f"; /api/slides: {len(soak.listings)} listings of {args.slides}+ changing slides, "
             f"all 200, max {max(soak.listings) * 1000:.0f} ms" if soak.listings
             and max(soak.listings) < float("inf") else "") + ".")
    print("PASS" if not problems else "FAIL: " + "; ".join(problems))
    print(json.dumps({"stderr_tail": errors.splitlines()[-5:]}) if problems else "", end="")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

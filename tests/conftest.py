"""Shared fixtures: tiny fake data sets in the real on-disk layouts, and the real-data marker."""

from __future__ import annotations

import contextlib
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breast_cancer_detection.data.synthetic import (  # noqa: F401  (re-exported to tests)
    SYNTHETIC_SLIDES,
    breakhis_relpath,
    write_synthetic_breakhis,
    write_tissue_png,
)

# The real data (../shared/data); $BCD_SHARED_DATA points the tests at another folder.
SHARED_DATA = Path(os.environ.get("BCD_SHARED_DATA")
                   or Path(__file__).resolve().parents[1].parent / "shared" / "data")

# The synthetic BreakHis tree lives in the package (bcd notebook --quick uses it too).
FAKE_SLIDES = SYNTHETIC_SLIDES


@pytest.fixture(scope="session")
def fake_breakhis(tmp_path_factory) -> Path:
    """A fake BreakHis tree: 12 slide folders (11 patients), 8 subtypes, 4 magnifications."""
    return write_synthetic_breakhis(tmp_path_factory.mktemp("breakhis"))


@pytest.fixture(scope="session")
def fake_imagefolder(tmp_path_factory) -> Path:
    """A pre-split ImageFolder (train/valid with 0/1 class folders), like the PCam subset."""
    root = tmp_path_factory.mktemp("pcam")
    rng = np.random.default_rng(1)
    for split, n in (("train", 16), ("valid", 8)):
        for cls in ("0", "1"):
            for k in range(n):
                write_tissue_png(root / split / cls / f"p{k:04d}.png", cls == "1", rng, (32, 32))
    return root


def png_claiming(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose header then claims another size (CRC fixed, data unchanged):
    a decompression bomb's header without the bomb."""
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 150)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_scan_bomb(side: int, copies: int) -> bytes:
    """A progressive JPEG of ``side`` x ``side`` px whose smallest scan (a dozen bytes) is
    repeated ``copies`` more times before its end: each copy is one more pass of the decoder
    over the whole image. ``copies=0`` is the ordinary progressive JPEG (about 10 scans)."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 100, 150)).save(buf, format="JPEG", progressive=True)
    data = buf.getvalue()
    scans, i = [], 2  # after SOI: segments of a 2-byte length, scans up to the next marker
    while data[i + 1] != 0xD9:  # EOI
        assert data[i] == 0xFF
        end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if data[i + 1] == 0xDA:  # SOS: entropy-coded data, 0xFF stuffed with 0x00 or RSTn
            while data[end] != 0xFF or data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end += 1
            scans.append(data[i:end])
        i = end
    return data[:i] + min(scans, key=len) * copies + data[i:]


@pytest.fixture(scope="session", autouse=True)
def _download_cache(tmp_path_factory):
    """Downloads and ONNX exports go to a temporary cache, never the user's home; a test
    that sets $BCD_CACHE itself wins."""
    before = os.environ.get("BCD_CACHE")
    os.environ["BCD_CACHE"] = str(tmp_path_factory.mktemp("bcd-cache"))
    yield
    if before is None:
        os.environ.pop("BCD_CACHE", None)
    else:
        os.environ["BCD_CACHE"] = before


def _missing_shared_data(marker) -> list[Path]:
    """What a ``real_data`` marker needs that is missing: the paths its arguments name under
    :data:`SHARED_DATA` (``@pytest.mark.real_data("pcam-subset")``), or the folder itself
    when it names none."""
    needed = [SHARED_DATA / name for name in marker.args] or [SHARED_DATA]
    return [p for p in needed if not p.exists()]


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        marker = item.get_closest_marker("real_data")
        missing = _missing_shared_data(marker) if marker is not None else []
        if missing:
            item.add_marker(pytest.mark.skip(
                reason="real data not found: " + ", ".join(map(str, missing))))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def _materialise_filelist(root: Path, filelist: Path) -> int:
    """Builds the full BreakHis tree with empty placeholders (indexing reads names only)."""
    n = 0
    for line in filelist.read_text().splitlines():
        if line.strip():
            p = root / line.strip()
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()
            n += 1
    return n


@pytest.fixture(scope="session")
def full_breakhis_index(tmp_path_factory):
    """The index of the whole 7,909-file BreakHis tree, made from the shared file list."""
    from breast_cancer_detection.data.breakhis import build_index

    root = tmp_path_factory.mktemp("full")
    n = _materialise_filelist(root, SHARED_DATA / "breakhis-filelist.txt")
    assert n == 7909
    return build_index(root)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


def need_module(module: str, install: str) -> None:
    """Skips a test without ``module`` on a user's machine; fails it in CI (``CI`` set), where
    ``.ci/run`` installs it with ``install``."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed: .ci/run installs it (`{install}`)")
        pytest.skip(f"{module} is not installed (`{install}`)")


# Progress bars would only clutter the test log.
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def trained_run(fake_breakhis, tmp_path_factory) -> Path:
    """A run folder (config.yaml, split.csv, best.pt...) of the tiny model, 3 epochs at 32 px.

    Shared by the session: copy it before writing into it (``bcd evaluate`` stores the
    threshold in ``best.pt``).
    """
    from breast_cancer_detection.config import TrainConfig, load_preset
    from breast_cancer_detection.engine import fit

    cfg = TrainConfig.from_dict({**load_preset("cpu-smoke"), "data": str(fake_breakhis),
                                 "runs_dir": str(tmp_path_factory.mktemp("runs")), "name": "r",
                                 "size": 32, "resize": 40, "epochs": 3, "val": 0.25,
                                 "test": 0.2})
    run = fit(cfg, progress=False).run_dir
    # Training stores a threshold chosen on val (tests/test_engine.py checks it). Cleared here
    # so that the tests of a checkpoint without one (the 0.5 fallback, evaluate storing its
    # own) start from that case.
    from breast_cancer_detection.checkpoint import load_checkpoint, save_checkpoint

    best = load_checkpoint(run / "best.pt")
    best.threshold, best.threshold_info = None, {}
    save_checkpoint(best, run / "best.pt")
    return run


class _FileHandler(BaseHTTPRequestHandler):
    """Serves ``files`` (URL path -> bytes) and records the paths asked for in ``seen``."""

    files: dict[str, bytes] = {}
    seen: list[str] = []

    def do_GET(self):  # noqa: N802 - the http.server API
        type(self).seen.append(self.path)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve_files(files: dict[str, bytes]):
    """A file server on 127.0.0.1 for the duration of the block; yields its handler class,
    whose ``url`` is the server's address and ``seen`` the paths requested."""
    handler = type("Handler", (_FileHandler,), {"files": dict(files), "seen": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield handler
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextlib.contextmanager
def serve_app(app, **config):
    """The app in a real uvicorn on a free port of 127.0.0.1, in a thread; yields the port.

    ``config``: more ``uvicorn.Config`` settings (log level, access log...).
    """
    import time

    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, **config))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start on 127.0.0.1")
        time.sleep(0.02)
    try:
        yield srv.servers[0].sockets[0].getsockname()[1]
    finally:
        srv.should_exit = True
        thread.join(timeout=15)


@pytest.fixture(scope="module")
def trained(trained_run) -> Path:
    """best.pt of the session's tiny run: 32 px crops of a 40 px resize, no threshold."""
    return trained_run / "best.pt"


@pytest.fixture(scope="module")
def predictor(trained):
    """A Predictor of :func:`trained` on the CPU."""
    from breast_cancer_detection.inference import Predictor

    return Predictor.from_checkpoint(trained, device="cpu")


"""The web server under hostile clients: request budgets, slow uploads, clients that leave,
and the browser-side guards (Host header, caching, referrers, local paths)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import resource
import socket
import threading
import time
import warnings
from pathlib import Path

import pytest
from PIL import Image

from conftest import jpeg_scan_bomb, png_claiming, serve_app

pytest.importorskip("fastapi", reason="the web app needs fastapi: pip install -e '.[app]'")
pytest.importorskip("multipart", reason="the web app needs python-multipart")
uvicorn = pytest.importorskip("uvicorn", reason="the web app needs uvicorn")
httpx = pytest.importorskip("httpx", reason="the API tests need httpx")

from breast_cancer_detection.app import create_app  # noqa: E402
from breast_cancer_detection.app import server as server_module  # noqa: E402
from breast_cancer_detection.app import service as service_module  # noqa: E402
from breast_cancer_detection.app import uploads as uploads_module  # noqa: E402
from breast_cancer_detection.inference import Predictor  # noqa: E402

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*install `httpx2`")
    from fastapi.testclient import TestClient  # noqa: E402

HOST = "127.0.0.1"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def predictor(trained_run) -> Predictor:
    """The session's tiny model: 32 px crops of a 40 px resize, so 40 px tiles."""
    return Predictor.from_checkpoint(trained_run / "best.pt", device="cpu")


def _client(app, **kwargs) -> TestClient:
    # The Host header a browser sends for http://127.0.0.1/, which the server answers to.
    return TestClient(app, base_url=f"http://{HOST}", **kwargs)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _files(*named: tuple[str, bytes]) -> list:
    return [("files", (name, data, "application/octet-stream")) for name, data in named]


GOOD = _png(Image.new("RGB", (70, 46), (230, 170, 210)))


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the request if the server decodes any image: the budget must refuse it first."""
    decoded = []

    def refuse(source, **kwargs):
        decoded.append(getattr(source, "name", source))
        raise RuntimeError("the server decoded an image that its budget should have refused")

    monkeypatch.setattr(service_module, "open_rgb", refuse)
    return decoded


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _serving(app):
    """The app in a real uvicorn on 127.0.0.1 with its access log; yields the port."""
    return serve_app(app, log_config=None, log_level="info", access_log=True)


_BOUNDARY = "hostile"


def _multipart_head(name: str) -> bytes:
    return (f"--{_BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; "
            f"filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\n").encode()


def _request_head(port: int, length: int) -> bytes:
    return (f"POST /api/predict HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={_BOUNDARY}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _stalled_upload(port: int, length: int = 200_000) -> socket.socket:
    """A client that sends the headers and the start of a body, then nothing."""
    s = socket.create_connection((HOST, port), timeout=30)
    s.sendall(_request_head(port, length) + _multipart_head("slow.png") + GOOD[:20])
    return s


def _read_answer(s: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b"}" in chunk:
                break
    return b"".join(chunks)


def _until(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ----------------------------------------------------------------------------- 3. budget


def test_a_one_bit_10000px_png_is_413_before_decoding(predictor, no_decoding):
    bomb = _png(Image.new("1", (10_000, 10_000)))  # 400 MB as RGB, a few KB on the wire
    assert len(bomb) < 50_000
    client = _client(create_app(predictor))
    rss, start = _peak_rss_mb(), time.perf_counter()
    r = client.post("/api/predict", files=_files(("bomb.png", bomb)))
    seconds = time.perf_counter() - start
    assert r.status_code == 413, r.text
    detail = r.json()["detail"]
    assert "--max-request-megapixels" in detail and "bomb.png" in detail
    assert not no_decoding
    assert seconds < 10.0, f"refusing took {seconds:.1f} s"  # a backstop: no_decoding decides
    assert _peak_rss_mb() - rss < 100, "the refusal grew the process by 100 MB or more"
    assert r.headers["cache-control"] == "no-store"


def test_the_pixel_budget_is_per_request_not_per_file(predictor, no_decoding):
    # Six 9 MP images, each one well under the per-image limit: 54 MP in all.
    part = _png(Image.new("1", (3000, 3000)))
    client = _client(create_app(predictor))
    r = client.post("/api/predict", files=_files(*[(f"p{i}.png", part) for i in range(6)]))
    assert r.status_code == 413, r.text
    detail = r.json()["detail"]
    assert "54.0 MP" in detail and "50 MP" in detail and "--max-request-megapixels" in detail
    assert not no_decoding

    roomy = _client(create_app(predictor, max_request_megapixels=60, max_request_tiles=10**6),
                    raise_server_exceptions=False)
    r = roomy.post("/api/predict", files=_files(*[(f"p{i}.png", part) for i in range(6)]))
    assert r.status_code != 413  # the flag raises the budget (the spy then refuses decoding)
    assert no_decoding


def test_a_thin_image_counts_the_pixels_of_its_resized_view(predictor, no_decoding):
    # 1 x 40000 pixels is nothing decoded, but resized to a 40 px short side it is 64 MP.
    thin = _png(Image.new("RGB", (40_000, 1), (200, 100, 150)))
    r = _client(create_app(predictor)).post("/api/predict", files=_files(("thin.png", thin)))
    assert r.status_code == 413, r.text
    assert "thin.png" in r.json()["detail"] and "--max-request-megapixels" in r.json()["detail"]
    assert not no_decoding


def test_the_tile_budget_refuses_before_decoding(predictor, no_decoding):
    big = png_claiming(400, 400)  # 19 x 19 tiles of 40 px, half overlapping
    # 361 tiles of 40 px are as much work as 361 * (40 / 224)**2 = 11.5 tiles of 224 px.
    client = _client(create_app(predictor, max_request_tiles=11))
    r = client.post("/api/predict", files=_files(("big.png", big)))
    assert r.status_code == 413, r.text
    detail = r.json()["detail"]
    assert "361 tiles" in detail and "as much model work as 12 of 224 px" in detail
    assert "--max-request-tiles" in detail
    assert not no_decoding


def test_the_bundled_models_small_tiles_count_by_their_area():
    from breast_cancer_detection.app.uploads import Upload as _Upload

    service = create_app(Predictor.from_pretrained("pcam-patch-cnn", progress=False)).state.service
    # 2,704 tiles of 96 px: over 2000 by count, 497 by the work of 224 px tiles.
    assert service.check_budget([_Upload("big.jpg", png_claiming(2500, 2500))])[1] == 2704


def test_default_budgets_admit_ordinary_requests(tmp_path):
    # A model at the project's real scale (224 px crops of a 256 px resize, 256 px tiles).
    from breast_cancer_detection.checkpoint import untrained_checkpoint

    predictor = Predictor.from_loaded(untrained_checkpoint("tiny"), device="cpu")
    service = create_app(predictor).state.service
    ordinary = [(f"b{i}.png", png_claiming(700, 460)) for i in range(8)] + [
        (f"w{i}.png", png_claiming(2000, 2000)) for i in range(4)]
    pixels, tiles = service.check_budget(
        [uploads_module.Upload(name, data) for name, data in ordinary])
    assert tiles == 8 + 4 * 15 * 15 and pixels == pytest.approx(
        8 * (700 * 460 + 256 * 389) + 4 * (2000 * 2000 + 256 * 256))
    health = _client(create_app(predictor)).get(
        "/api/health").json()
    assert (health["max_request_megapixels"], health["max_request_tiles"]) == (50, 2000)


def test_an_eps_file_is_415_and_never_handed_to_ghostscript(predictor):
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n"
           b"newpath 0 0 moveto 100 100 lineto stroke\nshowpage\n%%EOF\n")
    r = _client(create_app(predictor)).post("/api/predict", files=_files(("x.eps", eps)))
    assert r.status_code == 415, r.text
    assert r.json()["detail"].startswith("x.eps: ")


def test_formats_outside_the_allow_list_are_415_and_damaged_images_400(predictor):
    gif = io.BytesIO()
    Image.new("RGB", (70, 46), (230, 170, 210)).save(gif, format="GIF")
    client = _client(create_app(predictor))
    r = client.post("/api/predict", files=_files(("x.gif", gif.getvalue())))
    assert r.status_code == 415 and "PNG, JPEG, TIFF, BMP or WebP" in r.json()["detail"]
    r = client.post("/api/predict", files=_files(("cut.png", GOOD[:40])))
    assert r.status_code == 400 and "damaged" in r.json()["detail"], r.text


def test_a_progressive_jpeg_scan_bomb_is_400_at_once(predictor, monkeypatch):
    from PIL import ImageFile

    # 3,010 passes over the image, 45 KB: within every budget (361 tiles of the tiny model).
    bomb = jpeg_scan_bomb(400, 3000)
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda im: decoded.append(im.size) or real_load(im))
    client = _client(create_app(predictor))
    start = time.perf_counter()
    r = client.post("/api/predict", files=_files(("scans.jpg", bomb)))
    assert time.perf_counter() - start < 10.0  # a backstop: the decoder count decides
    assert r.status_code == 400, r.text
    assert decoded == []  # refused from its scan count, before any pixel was decoded
    detail = r.json()["detail"]
    assert detail.startswith("scans.jpg: ") and "scans" in detail and "baseline" in detail
    assert client.post("/api/predict", files=_files(
        ("ok.jpg", jpeg_scan_bomb(64, 0)))).status_code == 200


def test_an_upload_is_answered_upright_as_its_exif_orientation_says(predictor):
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (70, 46), (230, 170, 210)).save(buf, format="JPEG", exif=exif)
    r = _client(create_app(predictor)).post("/api/predict", files=_files(("p.jpg", buf.getvalue())))
    assert r.status_code == 200, r.text
    answer = r.json()["results"][0]
    assert (answer["width"], answer["height"]) == (46, 70)


def test_a_model_that_outputs_nan_is_a_500_never_a_label(predictor):
    import torch

    class NanModel(torch.nn.Module):
        def forward(self, x):
            return torch.full((len(x), 2), float("nan"))

    broken = Predictor(NanModel(), predictor.pre, device="cpu", arch="nan")
    r = _client(create_app(broken), raise_server_exceptions=False).post(
        "/api/predict", files=_files(("ok.png", GOOD)))
    assert r.status_code == 500 and "non-finite" in r.json()["detail"], r.text


# ----------------------------------------------------------------------------- 4. uploads


@pytest.mark.slow
def test_stalled_uploads_hold_no_model_slot_and_time_out_with_408(predictor):
    app = create_app(predictor, max_concurrency=1, max_queue=1, upload_timeout=2,
                     max_uploads=6)
    with _serving(app) as port:
        # More stalled uploads than model slots and queue places together.
        stalled = [_stalled_upload(port) for _ in range(5)]
        _until(lambda: app.state.gate.uploading == 5, "five uploads in progress")
        start = time.monotonic()
        with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=30) as client:
            ok = client.post("/api/predict", files=_files(("ok.png", GOOD)))
            assert ok.status_code == 200, ok.text
            health = client.get("/api/health").json()
            assert health["uploading"] == 5 and health["upload_timeout"] == 2
            # Past the separate bound on uploads in progress, a refusal, at once.
            extra = _stalled_upload(port)
            _until(lambda: app.state.gate.uploading == 6, "the sixth upload")
            refused = client.post("/api/predict", files=_files(("ok.png", GOOD)))
            assert refused.status_code == 503, refused.text
            assert "--max-uploads" in refused.json()["detail"]
            assert int(refused.headers["Retry-After"]) >= 1
        for s in [*stalled, extra]:
            answer = _read_answer(s)
            s.close()
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"--upload-timeout" in answer
        assert time.monotonic() - start < 2 + 5
        assert (app.state.gate.uploading, app.state.gate.admitted) == (0, 0)


def _head_options(app, seconds: float) -> dict:
    """uvicorn settings as `bcd serve` passes them, with a short request-head deadline."""
    return server_module.uvicorn_options(app, header_timeout=seconds)


def _closed_by_server(s: socket.socket) -> bool:
    """Whether the server has closed ``s`` (EOF, or a reset after data sent too late);
    raises TimeoutError when it stays open for the socket's timeout."""
    try:
        while chunk := s.recv(65536):
            del chunk  # an answer first (the kept-alive case): read on to the close
    except ConnectionResetError:
        pass
    return True


def _answer_of(s: socket.socket) -> bytes:
    """One whole answer with a Content-Length, read from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += s.recv(65536)
    return head


@pytest.mark.slow
def test_connections_without_a_request_head_are_closed_at_the_deadline(predictor):
    app = create_app(predictor)
    with serve_app(app, log_level="warning", **_head_options(app, 1.0)) as port:
        silent = socket.create_connection((HOST, port), timeout=8)
        slow = socket.create_connection((HOST, port), timeout=8)
        # A kept-alive connection: one whole request, then the next head a line at a time.
        kept = socket.create_connection((HOST, port), timeout=8)
        kept.sendall(f"GET /api/health HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        assert _answer_of(kept).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        stop = threading.Event()

        def trickle() -> None:
            lines = [b"GET /api/health HTTP/1.1\r\n", f"Host: {HOST}\r\n".encode()] + [
                f"X-Slow-{i}: 1\r\n".encode() for i in range(40)]
            for line in lines:
                for s in (slow, kept):
                    with contextlib.suppress(OSError):  # closed by the server: the point
                        s.sendall(line)
                if stop.wait(0.2):
                    return

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        try:
            with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=8) as client:
                assert client.get("/api/health").status_code == 200  # others are answered
            for s in (silent, slow, kept):
                assert _closed_by_server(s)
                # The sockets' own 8 s timeout fails the test if the server never closes;
                # the trickle alone would keep `slow` and `kept` open past 8 s.
                assert time.monotonic() - start < 1.0 + 6.0
            with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=8) as client:
                assert client.get("/api/health").status_code == 200
        finally:
            stop.set()
            sender.join()
            for s in (silent, slow, kept):
                s.close()


@pytest.mark.slow
def test_connections_past_the_limit_get_503_at_once(predictor):
    app = create_app(predictor, max_concurrency=1, max_queue=0, max_uploads=1)
    options = _head_options(app, 2.0)
    limit = 1 + 0 + 1 + server_module.CONNECTION_HEADROOM
    assert options["limit_concurrency"] == limit
    with serve_app(app, log_level="warning", **options) as port:
        idle = [socket.create_connection((HOST, port), timeout=8) for _ in range(limit)]
        try:
            statuses = []
            with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=8) as client:
                _until(lambda: statuses.append(client.get("/api/health").status_code)
                       or statuses[-1] == 503, "a 503 for a connection past the limit", 1.5)
                # The idle ones are closed at the head deadline, and places free again.
                _until(lambda: client.get("/api/health").status_code == 200,
                       "the idle connections to be closed", 5)
        finally:
            for s in idle:
                s.close()


# ----------------------------------------------------------------------------- 5. leaving


class _GatedPredictor:
    """The real predictor; its first predict waits for the test, and it counts the images."""

    def __init__(self, real: Predictor):
        self._real = real
        self.entered = threading.Event()
        self.release = threading.Event()
        self.images = 0

    def __getattr__(self, name):
        return getattr(self._real, name)

    def predict(self, images, *args, **kwargs):
        self.images += len(images) if isinstance(images, list) else 1
        self.entered.set()
        if not self.release.wait(timeout=60):
            raise RuntimeError("the test never released the predictor")
        return self._real.predict(images, *args, **kwargs)


def test_work_stops_when_the_client_has_left(predictor, monkeypatch):
    gated = _GatedPredictor(predictor)
    explained = []
    real_explain = service_module.explain
    monkeypatch.setattr(service_module, "explain",
                        lambda *a, **k: explained.append(1) or real_explain(*a, **k))
    app = create_app(gated)
    with _serving(app) as port:
        parts = [_multipart_head(f"{i}.png") + GOOD + b"\r\n" for i in range(4)]
        body = b"".join(parts) + f"--{_BOUNDARY}--\r\n".encode()
        s = socket.create_connection((HOST, port), timeout=30)
        s.sendall(_request_head(port, len(body)) + body)
        assert gated.entered.wait(timeout=30), "the request never reached the model"
        s.close()  # the client gives up while the first image is being predicted
        time.sleep(0.5)  # time for the server to notice
        gated.release.set()
        _until(lambda: app.state.gate.admitted == 0, "the request to end")
    assert gated.images == 1, f"{gated.images} images predicted for a client that had left"
    assert not explained


def test_a_disconnect_during_upload_is_one_log_line_not_a_500(predictor, caplog):
    caplog.set_level(logging.INFO)
    app = create_app(predictor, upload_timeout=20)
    with _serving(app) as port:
        s = _stalled_upload(port)
        _until(lambda: app.state.gate.uploading == 1, "the upload to start")
        s.close()
        _until(lambda: app.state.gate.uploading == 0, "the server to drop the upload", 10)
        time.sleep(0.2)
        with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=30) as client:
            assert client.get("/api/health").status_code == 200
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    access = [r for r in caplog.records if r.name == "uvicorn.access"]
    assert not [r for r in access if isinstance(r.args, tuple) and int(r.args[-1]) >= 500]
    gone = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(gone) == 1 and gone[0].name.startswith("breast_cancer_detection")
    assert "\n" not in gone[0].getMessage()


# ----------------------------------------------------------------------------- 11. browsers


def test_a_foreign_host_header_is_refused(predictor):
    client = _client(create_app(predictor))
    r = client.get("/api/model", headers={"Host": "evil.example"})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "evil.example" in detail and "--allowed-hosts" in detail
    assert r.headers["referrer-policy"] == "no-referrer"
    for host in ("127.0.0.1:8000", "localhost:8000", "localhost", "[::1]:8000"):
        assert client.get("/api/health", headers={"Host": host}).status_code == 200, host
    assert client.get("/", headers={"Host": "evil.example"}).status_code == 400

    named = _client(create_app(predictor, allowed_hosts=["lab.example"]))
    assert named.get("/api/model", headers={"Host": "lab.example:8000"}).status_code == 200
    assert named.get("/api/model", headers={"Host": "evil.example"}).status_code == 400
    anyone = _client(create_app(predictor, allowed_hosts=["*"]))
    assert anyone.get("/api/model", headers={"Host": "evil.example"}).status_code == 200


def test_a_request_without_a_host_header_is_told_to_send_one(predictor):
    app = create_app(predictor)
    r = _client(app).get("/api/health", headers={"Host": ""})
    assert r.status_code == 400 and "send one" in r.json()["detail"], r.text
    assert "--allowed-hosts" not in r.json()["detail"]
    # HTTP/1.0 lets a client leave it out altogether.
    with _serving(app) as port, socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(b"GET /api/health HTTP/1.0\r\n\r\n")
        answer = _read_answer(s)
    assert answer.startswith(b"HTTP/1.1 400") and b"no Host header" in answer, answer[:300]


def test_uploads_from_other_sites_pages_are_403(predictor):
    client = _client(create_app(predictor, allowed_hosts=["lab.example"]))
    own = f"http://{HOST}:8000"
    for headers in ({"Sec-Fetch-Site": "cross-site", "Origin": own},
                    {"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Origin": "http://localhost:8000"}, {"Origin": "http://10.1.2.3"}):
        r = client.post("/api/predict", files=_files(("a.png", GOOD)), headers=headers)
        assert r.status_code == 403, (headers, r.text)
        detail = r.json()["detail"]
        assert "cross-site request refused" in detail and f"open http://{HOST}/" in detail
        assert r.headers["cache-control"] == "no-store"
    assert "--allowed-hosts evil.example" in client.post(
        "/api/predict", files=_files(("a.png", GOOD)),
        headers={"Origin": "http://evil.example"}).json()["detail"]
    # The page itself (same origin), a name given with --allowed-hosts (a proxy), and
    # clients that are not browsers (no Origin) are answered; reading is never refused.
    for headers in ({"Sec-Fetch-Site": "same-origin", "Origin": f"http://{HOST}"},
                    {"Origin": "https://lab.example"}, {}):
        r = client.post("/api/predict", files=_files(("a.png", GOOD)), headers=headers)
        assert r.status_code == 200, (headers, r.text)
    r = client.get("/api/health", headers={"Sec-Fetch-Site": "cross-site",
                                           "Origin": "http://evil.example"})
    assert r.status_code == 200


def test_answers_carry_no_store_and_no_referrer(predictor):
    client = _client(create_app(predictor))
    ok = client.post("/api/predict", files=_files(("a.png", GOOD)))
    assert ok.status_code == 200
    bad = client.post("/api/predict", files=_files(("a.txt", b"text")))
    assert bad.status_code == 415
    for r in (ok, bad):
        assert r.headers["cache-control"] == "no-store"
    for path in ("/", "/app.js", "/api/health", "/api/model", "/openapi.json", "/missing"):
        r = client.get(path)
        assert r.headers.get("referrer-policy") == "no-referrer", path
    assert ok.headers["referrer-policy"] == "no-referrer"


def test_the_model_card_shows_no_local_paths(predictor, trained_run):
    card = _client(create_app(predictor)).get("/api/model").json()
    text = json.dumps(card)
    assert str(trained_run.parent) not in text and os.sep + "tmp" not in text

    def strings(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from strings(v)
        elif isinstance(x, list):
            for v in x:
                yield from strings(v)
        elif isinstance(x, str):
            yield x

    assert not [s for s in strings(card) if os.path.isabs(s)]
    assert card["training"]["data"] == Path(predictor.checkpoint.config["data"]).name


def test_a_full_queue_refuses_before_the_body_is_read(predictor, monkeypatch):
    from breast_cancer_detection.app import routes_predict

    app = create_app(predictor, max_concurrency=1, max_queue=1)
    app.state.gate.admitted = 2  # one running, one waiting: full

    async def never(*args, **kwargs):
        raise AssertionError("the body was read although the queue was full")

    monkeypatch.setattr(routes_predict, "read_uploads", never)
    r = _client(app).post("/api/predict", files=_files(("a.png", _png(Image.new("RGB", (64, 64))))))
    assert r.status_code == 503 and "Retry-After" in r.headers
    assert "queue limit 1" in r.json()["detail"]

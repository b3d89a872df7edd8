"""The web app's API: health, model card, predictions, every kind of bad input, a full queue."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import json
import re
import shutil
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import png_claiming

pytest.importorskip("fastapi", reason="the web app needs fastapi: pip install -e '.[app]'")
pytest.importorskip("multipart", reason="the web app needs python-multipart")
httpx = pytest.importorskip("httpx", reason="the API tests need httpx")

from breast_cancer_detection.app import create_app  # noqa: E402
from breast_cancer_detection.app.server import (  # noqa: E402
    CONNECTION_HEADROOM,
    PREVIEW_SIDE,
)
from breast_cancer_detection.checkpoint import load_checkpoint  # noqa: E402
from breast_cancer_detection.cli import main  # noqa: E402
from breast_cancer_detection.errors import UserError  # noqa: E402
from breast_cancer_detection.inference import Predictor  # noqa: E402

with warnings.catch_warnings():
    # Starlette suggests httpx2 for its TestClient; httpx is what FastAPI documents.
    warnings.filterwarnings("ignore", message=".*install `httpx2`")
    from fastapi.testclient import TestClient  # noqa: E402

STATIC = Path(__file__).resolve().parents[1] / "src" / "breast_cancer_detection" / "app" / "static"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def best(trained_run) -> Path:
    """best.pt of the session's tiny run (32 px crops of a 40 px resize, no threshold)."""
    return trained_run / "best.pt"


@pytest.fixture(scope="module")
def predictor(best) -> Predictor:
    return Predictor.from_checkpoint(best, device="cpu")


@pytest.fixture(scope="module")
def client(predictor) -> TestClient:
    return _client(create_app(predictor))


def _client(app) -> TestClient:
    # A Host the server answers to (it refuses names it was not given: DNS rebinding).
    return TestClient(app, base_url="http://127.0.0.1")


def _png(h: int, w: int, malignant: bool, seed: int = 0) -> bytes:
    # The colours of conftest's fake BreakHis images, which the tiny model learned.
    base = np.array([120, 60, 140]) if malignant else np.array([230, 170, 210])
    arr = base + np.random.default_rng(seed).integers(-25, 25, size=(h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _noise_png(side: int) -> bytes:
    """A PNG that does not compress: about 3 bytes per pixel."""
    arr = np.random.default_rng(1).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    return png_claiming(width, height)


def _files(*named: tuple[str, bytes]) -> list:
    return [("files", (name, data, "application/octet-stream")) for name, data in named]


def _decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix), url[:40]
    image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))
    assert image.format == "PNG"
    image.load()
    return image


GOOD = _png(46, 70, malignant=False)


# ----------------------------------------------------------------------------- service


def test_health_names_the_model_and_the_limits(client, predictor):
    r = client.get("/api/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["model"] == predictor.checkpoint.arch == "tiny"
    assert body["threshold"] == 0.5 and body["backend"] == "torch"
    assert (body["max_upload_mb"], body["max_concurrency"], body["max_queue"]) == (20, 1, 8)
    assert (body["running"], body["waiting"]) == (0, 0)


def test_model_card_is_read_from_the_checkpoint(client, best):
    ckpt = load_checkpoint(best)
    card = client.get("/api/model").json()
    assert card["architecture"] == "tiny" and card["classes"] == ["benign", "malignant"]
    assert card["preprocessing"]["size"] == 32 and card["preprocessing"]["resize"] == 40
    assert "40 px" in card["preprocessing"]["description"]
    training = card["training"]
    assert training["data"] == Path(ckpt.config["data"]).name  # no local paths shown
    assert training["split_hash"] == ckpt.split_hash
    assert training["patients"] == {k: len(v) for k, v in ckpt.split_patients.items()}
    assert sum(training["patients"].values()) == 11  # the fake tree's 11 patients
    assert card["metrics"]["validation"]["val_auc"] == pytest.approx(ckpt.metrics["val_auc"])
    assert card["metrics"]["evaluation"] is None
    assert "bcd evaluate" in card["metrics"]["note"]
    assert card["threshold"]["value"] == 0.5 and "default" in card["threshold"]["source"]
    # A checkpoint of one's own: its scope said from its training data.
    assert card["intended_use"].startswith("Research and teaching")
    assert "BreaKHis_v1" in card["intended_use"] and "not a medical device" in card["not_for"]
    assert card["versions"]["training"] == ckpt.versions
    assert card["versions"]["serving"]["torch"] == str(torch.__version__)


@pytest.mark.slow
def test_model_card_shows_test_metrics_with_cis_from_an_evaluation(trained_run, fake_breakhis,
                                                                   tmp_path):
    from breast_cancer_detection.evaluation import evaluate_checkpoint

    ckpt = shutil.copy(trained_run / "best.pt", tmp_path / "best.pt")
    ev = evaluate_checkpoint(ckpt, fake_breakhis, split=trained_run / "split.csv",
                             out=tmp_path / "report", bootstrap=20, device="cpu",
                             progress=False)
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    assert predictor.threshold != 0.5  # evaluate chose one on val and stored it
    report = tmp_path / "report" / "metrics.json"
    card = _client(create_app(predictor, report=report)).get("/api/model").json()
    evaluation = card["metrics"]["evaluation"]
    assert evaluation["subset"] == "test" and evaluation["images"] == ev.metrics.counts["images"]
    assert evaluation["ci_level"] == pytest.approx(0.95)
    stored = json.loads(report.read_text())
    assert evaluation["ci"] == stored["ci"] and evaluation["image"] == stored["image"]
    assert card["metrics"]["note"] is None
    assert card["threshold"]["value"] == pytest.approx(predictor.threshold)
    assert card["threshold"]["source"] == "chosen on validation"
    assert card["threshold"]["chosen_on"] == "val"
    assert not any("computed at threshold" in c for c in evaluation["caveats"])

    # The same report beside a checkpoint answering at another threshold says so.
    other = Predictor.from_checkpoint(ckpt, device="cpu")
    other.threshold = 0.9
    card = create_app(other, report=report).state.service.card
    assert any("computed at threshold" in c for c in card["metrics"]["evaluation"]["caveats"])

    # A report of a model trained on another split is refused at start-up.
    wrong = {**stored, "checkpoint": {**stored["checkpoint"], "split_hash": "0" * 16}}
    with pytest.raises(UserError, match="another model"):
        create_app(predictor, report=wrong)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not a metrics.json"):
        create_app(predictor, report=tmp_path / "bad.json")


def test_openapi_lists_the_routes_and_docs_are_served(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert {"/api/predict", "/api/health", "/api/model"} <= set(paths)
    assert "post" in paths["/api/predict"] and "get" in paths["/api/health"]
    body = paths["/api/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["properties"]["files"]["type"] == "array"
    assert {"200", "400", "413", "415", "503"} <= set(paths["/api/predict"]["post"]["responses"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "openapi.json" in docs.text


def test_page_is_served_and_loads_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Research tool, not a medical device." in page.text
    assert 'id="files"' in page.text and 'for="files"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("index.html", "app.js", "style.css"):
        r = client.get(f"/{name}")
        assert r.status_code == 200, name
        assert "http://" not in r.text and "https://" not in r.text, name
        assert "//cdn" not in r.text and "@import" not in r.text, name
    assert len(list(STATIC.iterdir())) == 3  # what the page needs is all in the package


def test_the_page_names_every_format_read_and_links_to_no_page_that_needs_a_cdn(client):
    page = client.get("/").text
    help_text = re.search(r'<p id="upload-help"[^>]*>(.*?)</p>', page, re.S)[1]
    assert " ".join(help_text.split()).startswith("PNG, JPEG, TIFF, BMP or WebP;")
    # /docs (Swagger UI) loads its script from a CDN, which the page's policy blocks.
    links = re.findall(r'href="([^"]*)"', page)
    assert "docs" not in links and "/docs" not in links and "openapi.json" in links


def test_predict_one_image(client, predictor):
    r = client.post("/api/predict", files=_files(("tissue.png", GOOD)))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and body["seconds"] > 0
    (res,) = body["results"]
    assert res["name"] == "tissue.png"
    assert set(res["probabilities"]) == {"benign", "malignant"}
    assert sum(res["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert res["p_malignant"] == res["probabilities"]["malignant"]
    assert res["label"] == ("malignant" if res["p_malignant"] >= res["threshold"] else "benign")
    assert res["threshold"] == 0.5 and "default" in res["threshold_source"]
    assert (res["width"], res["height"], res["tiles"]) == (70, 46, 1)
    assert res["heatmap"] is None and res["tile_heatmap"] is None
    direct = predictor.predict(Image.open(io.BytesIO(GOOD)))[0]
    assert res["p_malignant"] == pytest.approx(direct.p_malignant, abs=1e-5)
    cam = _decode_data_url(res["cam"])
    assert cam.size == (70, 46) and cam.mode == "RGB"  # the image's frame and aspect


def test_predict_several_images_in_order_with_a_tiled_one(client):
    large = _png(100, 120, malignant=True, seed=3)  # short side 100 > 2 tiles of 40: tiled
    r = client.post("/api/predict", files=_files(("b.png", GOOD),
                                                 ("m.png", _png(46, 70, True, seed=1)),
                                                 ("large.png", large)))
    assert r.status_code == 200, r.text
    b, m, big = r.json()["results"]
    assert [b["name"], m["name"], big["name"]] == ["b.png", "m.png", "large.png"]
    for res in (b, m, big):
        assert sum(res["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert res["label"] == ("malignant" if res["p_malignant"] >= 0.5 else "benign")
        # A tiled image's Grad-CAM is stitched from its tiles, in the image's own frame.
        assert _decode_data_url(res["cam"]).size == ((120, 100) if res is big else (70, 46))
    assert m["p_malignant"] > b["p_malignant"]  # dark tissue is what the model calls malignant
    heat = np.array(big["heatmap"])
    assert heat.shape == (4, 5) and big["tiles"] == heat.size  # 40 px tiles, half overlapping
    assert ((heat >= 0) & (heat <= 1)).all()
    assert heat.mean() == pytest.approx(big["p_malignant"], abs=1e-5)
    assert _decode_data_url(big["tile_heatmap"]).size == (120, 100)
    assert b["heatmap"] is None and m["tile_heatmap"] is None


@pytest.mark.slow
def test_tile_heat_map_of_a_large_image_is_shrunk(client):
    side = PREVIEW_SIDE + 200
    r = client.post("/api/predict", files=_files(("slide.png", _png(side // 2, side, False))))
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    assert (res["width"], res["height"]) == (side, side // 2)
    assert _decode_data_url(res["tile_heatmap"]).size == (PREVIEW_SIDE, PREVIEW_SIDE // 2)


# ----------------------------------------------------------------------------- bad input


def test_upload_over_the_limit_is_413_by_content_length_and_by_count(predictor):
    app = create_app(predictor, max_upload_mb=0.05)  # 51 KiB
    client = _client(app)
    big = _noise_png(160)  # ~77 KB
    assert len(big) > 0.05 * 1024 * 1024
    r = client.post("/api/predict", files=_files(("big.png", big)))
    assert r.status_code == 413
    assert "0.05 MB" in r.json()["detail"] and "--max-upload-mb" in r.json()["detail"]

    # Without Content-Length (chunked), the bytes are counted as they arrive.
    boundary = "bcdboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
            f"filename=\"big.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + big + (
            f"\r\n--{boundary}--\r\n").encode()
    chunks = [body[i:i + 8192] for i in range(0, len(body), 8192)]
    r = client.post("/api/predict", content=iter(chunks),
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert r.status_code == 413, r.text
    assert "0.05 MB" in r.json()["detail"]

    small = client.post("/api/predict", files=_files(("ok.png", GOOD)))
    assert small.status_code == 200  # the limit, not the app, refused the big one


@pytest.mark.parametrize("name, data", [
    ("notes.txt", b"hello, this is text"),
    ("paper.pdf", b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n"),
    ("empty.png", b""),
])
def test_a_file_that_is_not_an_image_is_415(client, name, data):
    r = client.post("/api/predict", files=_files((name, data)))
    assert r.status_code == 415, r.text
    assert r.json()["detail"].startswith(f"{name}: ")


def test_a_body_that_is_not_multipart_is_415(client):
    r = client.post("/api/predict", json={"files": ["a.png"]})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]


def test_a_decompression_bomb_is_400_before_decoding(client, predictor):
    bomb = _png_claiming(30000, 30000)
    assert len(bomb) < 200
    r = client.post("/api/predict", files=_files(("bomb.png", bomb)))
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert detail.startswith("bomb.png: ") and "pixels" in detail

    # Under Pillow's own limit, ours applies, and the app's max_pixels sets it.
    strict = _client(create_app(predictor, max_pixels=1000))
    r = strict.post("/api/predict", files=_files(("tissue.png", GOOD)))  # 70 x 46 = 3,220 px
    assert r.status_code == 400 and "over the limit of 1,000" in r.json()["detail"]


def test_corrupt_and_truncated_images_are_400(client):
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(_noise_png(64))).save(jpeg, format="JPEG")
    cases = {
        "corrupt.png": GOOD[:40] + bytes(range(256)) * 4,
        "truncated.png": GOOD[: len(GOOD) // 2],
        "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
    }
    for name, data in cases.items():
        r = client.post("/api/predict", files=_files((name, data)))
        assert r.status_code == 400, (name, r.text)
        detail = r.json()["detail"]
        assert detail.startswith(f"{name}: ") and "corrupt" in detail, detail
    assert "PNG" in client.post("/api/predict",
                                files=_files(("corrupt.png", cases["corrupt.png"]))
                                ).json()["detail"]


def test_one_bad_file_refuses_a_request_of_several(client):
    r = client.post("/api/predict", files=_files(("a.png", GOOD), ("notes.txt", b"text")))
    assert r.status_code == 415 and r.json()["detail"].startswith("notes.txt: ")
    r = client.post("/api/predict", files=_files(("a.png", GOOD),
                                                 ("bomb.png", _png_claiming(30000, 30000))))
    assert r.status_code == 400 and r.json()["detail"].startswith("bomb.png: ")


def test_a_request_without_files_is_422(client):
    r = client.post("/api/predict", files=[("image", ("a.png", GOOD, "image/png"))])
    assert r.status_code == 422 and "'files'" in r.json()["detail"]
    r = client.post("/api/predict", data={"files": "a.png"})  # a form, but not multipart
    assert r.status_code == 415 and "'files'" in r.json()["detail"]
    r = client.post("/api/predict", files={"files": (None, "just text")})
    assert r.status_code == 422 and "file uploads" in r.json()["detail"]


def _multipart(boundary: str, *named: tuple[str, bytes]) -> bytes:
    return b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
                    f"filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\n".encode()
                    + data + b"\r\n" for name, data in named)


def test_a_body_without_its_closing_boundary_is_400_not_fewer_answers(client):
    boundary = "cut"
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    whole = _multipart(boundary, ("a.png", GOOD), ("b.png", GOOD)) + b"--cut--\r\n"
    r = client.post("/api/predict", content=whole, headers=headers)
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    # Cut inside the second file, and just before the closing delimiter: two files sent,
    # at most one would be answered; one file cut short would be "no files".
    for body in (whole[:len(whole) - len(GOOD) // 2], whole[:-len(b"--cut--\r\n")],
                 _multipart(boundary, ("a.png", GOOD))[:-50]):
        r = client.post("/api/predict", content=body, headers=headers)
        assert r.status_code == 400, r.text
        detail = r.json()["detail"]
        assert "incomplete upload (no closing boundary)" in detail and "send it again" in detail
    # The delimiter split across two chunks, or followed by an epilogue, is a whole body.
    at = len(whole) - 6
    r = client.post("/api/predict", content=iter([whole[:at], whole[at:]]), headers=headers)
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    r = client.post("/api/predict", content=whole + b"an epilogue\r\n", headers=headers)
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    quoted = {"Content-Type": 'multipart/form-data; boundary="cut"'}
    assert client.post("/api/predict", content=whole, headers=quoted).status_code == 200


def test_more_files_than_the_limit_is_413_saying_how_many(client):
    from breast_cancer_detection.app.server import MAX_FILES

    r = client.post("/api/predict", files=_files(*[(f"{i}.png", GOOD)
                                                  for i in range(MAX_FILES + 1)]))
    assert r.status_code == 413, r.text
    assert f"send at most {MAX_FILES} files per request" in r.json()["detail"]
    r = client.post("/api/predict", files=_files(("a.png", GOOD)),
                    data={f"f{i}": "x" for i in range(MAX_FILES + 1)})
    assert r.status_code == 413 and "form fields" in r.json()["detail"], r.text


def test_bad_requests_leave_the_server_answering(client):
    before = client.post("/api/predict", files=_files(("a.png", GOOD))).json()["results"][0]
    statuses = [client.post("/api/predict", files=_files((name, data))).status_code
                for name, data in [("x.txt", b"x"), ("bomb.png", _png_claiming(30000, 30000)),
                                   ("t.png", GOOD[:100]), ("e.png", b"")]]
    assert statuses == [415, 400, 400, 415]
    after = client.post("/api/predict", files=_files(("a.png", GOOD)))
    assert after.status_code == 200
    assert after.json()["results"][0]["p_malignant"] == pytest.approx(before["p_malignant"])
    assert client.get("/api/health").json()["status"] == "ok"


# ----------------------------------------------------------------------------- load


class _BlockingPredictor:
    """The real predictor, whose predict waits until the test lets it go."""

    def __init__(self, real: Predictor):
        self._real = real
        self.release = threading.Event()
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._real, name)

    def predict(self, *args, **kwargs):
        self.calls += 1
        if not self.release.wait(timeout=60):
            raise RuntimeError("the test never released the predictor")
        return self._real.predict(*args, **kwargs)


async def _until(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_a_full_queue_answers_503_with_retry_after_and_the_loop_stays_free(predictor):
    blocking = _BlockingPredictor(predictor)
    app = create_app(blocking, max_concurrency=1, max_queue=2)
    gate = app.state.gate

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as ac:
            def post(name):
                return ac.post("/api/predict", files=_files((name, GOOD)))

            first = asyncio.create_task(post("first.png"))
            await _until(lambda: blocking.calls == 1, "the first request to reach the model")
            queued = [asyncio.create_task(post(f"q{i}.png")) for i in range(2)]
            await _until(lambda: gate.admitted == 3, "two requests to queue")

            # Inference runs in a worker thread: the event loop still answers.
            health = await asyncio.wait_for(ac.get("/api/health"), timeout=5)
            assert (health.json()["running"], health.json()["waiting"]) == (1, 2)
            refused = await post("one-too-many.png")
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["Retry-After"]) >= 1
            assert "busy" in refused.json()["detail"]
            assert blocking.calls == 1 and not any(t.done() for t in [first, *queued])

            blocking.release.set()
            answers = await asyncio.gather(first, *queued)
            assert [a.status_code for a in answers] == [200, 200, 200]
            assert [a.json()["results"][0]["name"] for a in answers] == [
                "first.png", "q0.png", "q1.png"]
            assert (gate.admitted, gate.running) == (0, 0)
            again = await post("after.png")
            assert again.status_code == 200

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- start-up


def test_create_app_checks_its_arguments(predictor, best):
    with pytest.raises(UserError, match="predictor or a checkpoint"):
        create_app()
    with pytest.raises(UserError, match="predictor or a checkpoint"):
        create_app(predictor, checkpoint=best)
    with pytest.raises(UserError, match="max_concurrency"):
        create_app(predictor, max_concurrency=0)
    with pytest.raises(UserError, match="max_upload_mb"):
        create_app(predictor, max_upload_mb=0)


def test_uploads_are_scored_on_onnx_runtime_and_explained_with_pytorch(predictor, best):
    pytest.importorskip("onnxruntime")
    app = create_app(predictor, backend="onnx")
    service = app.state.service
    assert service.scorer.backend == "onnx" and service.predictor is predictor
    client = _client(app)
    assert client.get("/api/health").json()["backend"] == "onnx"
    card = client.get("/api/model").json()
    assert card["backend"] == "onnx" and card["backend_note"] == "ONNX Runtime (CPU)"
    r = client.post("/api/predict", files=_files(("tissue.png", GOOD)))
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    direct = predictor.predict(Image.open(io.BytesIO(GOOD)))[0]
    assert res["p_malignant"] == pytest.approx(direct.p_malignant, abs=1e-4)
    assert _decode_data_url(res["cam"]).size == (70, 46)  # Grad-CAM still from PyTorch
    with pytest.raises(UserError, match="backend"):
        create_app(predictor, backend="tensorflow")
    # A checkpoint loaded at start-up gets the same choice.
    app = create_app(checkpoint=best, device="cpu", backend="onnx")
    with _client(app) as client:
        assert client.get("/api/health").json()["backend"] == "onnx"
        assert app.state.service.predictor.backend == "torch"


def test_a_checkpoint_loads_once_at_start_up(best):
    app = create_app(checkpoint=best, device="cpu")
    assert app.state.service.predictor is None  # nothing loaded until the server starts
    with _client(app) as client:
        loaded = app.state.service.predictor
        assert loaded is not None
        assert client.get("/api/health").json()["model"] == "tiny"
        r = client.post("/api/predict", files=_files(("a.png", GOOD)))
        assert r.status_code == 200
        assert app.state.service.predictor is loaded  # not reloaded per request


def test_bcd_serve_binds_to_localhost_by_default(best, monkeypatch, capsys):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    assert main(["serve", str(best), "--device", "cpu", "--quiet", "--max-queue", "3"]) == 0
    (app, kw), = calls
    assert kw["host"] == "127.0.0.1" and kw["port"] == 8000
    assert app.state.gate.max_queue == 3 and app.state.service.predictor is not None
    service, gate = app.state.service, app.state.gate
    assert (service.max_request_megapixels, service.max_request_tiles) == (50, 2000)
    assert (service.upload_timeout, gate.max_uploads) == (30, 32)
    # uvicorn closes connections that send no request head, and answers 503 past the places.
    from uvicorn.protocols.http.h11_impl import H11Protocol

    assert issubclass(kw["http"], H11Protocol) and kw["http"].head_timeout == 10
    assert kw["limit_concurrency"] == 32 + 1 + 3 + CONNECTION_HEADROOM
    client = _client(app)
    assert client.get("/api/health", headers={"Host": "lab.example"}).status_code == 400

    calls.clear()
    assert main(["serve", str(best), "--quiet", "--max-request-megapixels", "5",
                 "--max-request-tiles", "7", "--upload-timeout", "4", "--max-uploads", "2",
                 "--allowed-hosts", "lab.example,other.example", "--header-timeout", "2.5"]) == 0
    app = calls[0][0]
    assert calls[0][1]["http"].head_timeout == 2.5
    assert calls[0][1]["limit_concurrency"] == 2 + 1 + 8 + CONNECTION_HEADROOM
    service, gate = app.state.service, app.state.gate
    assert (service.max_request_megapixels, service.max_request_tiles) == (5, 7)
    assert (service.upload_timeout, gate.max_uploads) == (4, 2)
    client = _client(app)
    for host in ("lab.example", "other.example:8000", "127.0.0.1"):
        assert client.get("/api/health", headers={"Host": host}).status_code == 200, host
    assert client.get("/api/health", headers={"Host": "evil.example"}).status_code == 400
    out = capsys.readouterr().out
    assert "http://127.0.0.1:8000/" in out
    # `bcd serve` scores with the fastest backend it has (ONNX Runtime on a CPU, when
    # installed), and says so; Grad-CAM stays on PyTorch.
    onnx = importlib.util.find_spec("onnxruntime") is not None
    assert app.state.service.scorer.backend == ("onnx" if onnx else "torch")
    assert ("scored with ONNX Runtime (CPU); Grad-CAM with PyTorch." if onnx
            else "scored with PyTorch on cpu; Grad-CAM with PyTorch.") in out

    calls.clear()
    assert main(["serve", str(best), "--host", "0.0.0.0", "--port", "9001", "--quiet"]) == 0
    assert calls[0][1]["host"] == "0.0.0.0" and calls[0][1]["port"] == 9001
    assert "reachable from other machines" in capsys.readouterr().err

    assert main(["serve", str(best.with_name("missing.pt")), "--quiet"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["serve", str(best), "--quiet", "--header-timeout", "0"]) == 2
    assert "--header-timeout" in capsys.readouterr().err
    assert not calls[1:]  # nothing was served


def test_a_wrong_method_or_an_unknown_api_path_is_answered_in_json_that_says_what_is(client):
    r = client.get("/api/predict")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["detail"] == "GET is not answered at /api/predict: use POST."
    r = client.put("/api/health")
    assert r.status_code == 405 and "use GET" in r.json()["detail"]
    r = client.get("/api/nope")
    assert r.status_code == 404
    assert "POST /api/predict" in r.json()["detail"] and "/openapi.json" in r.json()["detail"]
    assert client.get("/api/health").status_code == 200  # the real routes come first
    assert client.get("/").status_code == 200 and "<html" in client.get("/").text


def test_model_card_counts_the_patients_that_chose_the_threshold_never_names_them(best,
                                                                                 tmp_path):
    from breast_cancer_detection.checkpoint import save_checkpoint

    ckpt = load_checkpoint(best).with_threshold(0.4, {"method": "youden", "chosen_on": "val",
                                                      "val_patient_ids": ["14-1", "p-77"]})
    path = save_checkpoint(ckpt, tmp_path / "t.pt")
    card = _client(create_app(Predictor.from_checkpoint(path, device="cpu"))).get(
        "/api/model").json()
    assert card["threshold"]["val_patients"] == 2
    assert "14-1" not in json.dumps(card) and "p-77" not in json.dumps(card)


def test_paths_relative_to_a_parent_folder_are_cut_to_their_last_part_too():
    from breast_cancer_detection.app.card import without_local_paths as _without_local_paths

    card = {"data": "../shared/data/pcam-subset", "split": ["./runs/r/split.csv"],
            "here": "data/BreaKHis_v1", "home": "/home/someone/x", "win": "..\\w\\z"}
    assert _without_local_paths(card) == {"data": "pcam-subset", "split": ["split.csv"],
                                          "here": "data/BreaKHis_v1", "home": "x", "win": "z"}

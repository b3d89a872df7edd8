"""The web service: the prediction API and the page, around one loaded Predictor."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import platform
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..data.datasets import ImageError, open_rgb
from ..errors import UserError
from ..evaluation import EvaluationResult
from ..explain import explain, overlay
from ..files import jsonable
from ..inference import Predictor

STATIC = Path(__file__).with_name("static")
"""The page: plain HTML, JavaScript and CSS, served as they are."""

INTENDED_USE = (
    "Research tool, not a medical device. It tells benign from malignant tissue in H&E "
    "histopathology images like those of BreakHis (breast biopsies, 40X-400X), for research "
    "and teaching. It has not been cleared or validated for clinical use and must not be used "
    "to diagnose, treat or triage patients; its answer is no substitute for a pathologist's.")

MAX_FILES = 32
"""Files accepted in one request."""

PREVIEW_SIDE = 1024
"""Long side, in pixels, of the tile heat map picture sent back for a large image."""

# The page loads nothing from elsewhere; the browser enforces it. /docs is left out: FastAPI's
# Swagger UI loads its script from a CDN.
_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

# Leading bytes of the formats Pillow reads: a file that starts like one of them but cannot
# be opened is a damaged image (400), not something other than an image (415).
_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF", b"BM": "BMP", b"GIF87a": "GIF", b"GIF89a": "GIF",
    b"\x00\x00\x00\x0cjP  ": "JPEG 2000",
}


# ----------------------------------------------------------------------------- schemas


class ImageResult(BaseModel):
    """The answer for one uploaded image."""

    name: str = Field(description="The file name as uploaded.")
    label: str = Field(description="The class at the threshold on P(malignant).")
    p_malignant: float = Field(description="Probability of the malignant class.")
    probabilities: dict[str, float] = Field(description="Class name -> probability.")
    threshold: float = Field(description="P(malignant) at or above which the label is "
                                         "malignant.")
    threshold_source: str = Field(description="How the threshold was chosen.")
    tiles: int = Field(description="Tiles averaged: 1 for an image predicted whole.")
    heatmap: list[list[float]] | None = Field(
        description="P(malignant) per tile, rows top to bottom, for a tiled image; else null.")
    width: int = Field(description="Image width in pixels.")
    height: int = Field(description="Image height in pixels.")
    cam: str | None = Field(
        description="Grad-CAM of the label's class over the model's view of the image "
                    "(short side resized, centre crop), as a data:image/png;base64 URL; null "
                    "for an ONNX model, which has no gradients.")
    tile_heatmap: str | None = Field(
        description="For a tiled image, the tile heat map over the image (green: low "
                    "P(malignant), red: high) as a PNG data URL; else null.")


class PredictResponse(BaseModel):
    """Answers for all the images of one request, in upload order."""

    results: list[ImageResult]
    model: str = Field(description="The architecture that answered.")
    seconds: float = Field(description="Time spent preparing, predicting and explaining.")


class Health(BaseModel):
    """The service is up and the model loaded."""

    status: str
    model: str
    backend: str
    device: str
    threshold: float
    version: str
    max_upload_mb: float
    max_concurrency: int
    max_queue: int
    running: int = Field(description="Requests being answered now.")
    waiting: int = Field(description="Requests admitted and waiting for their turn.")


class ErrorBody(BaseModel):
    """Why a request was refused, and what to do about it."""

    detail: str


_MULTIPART = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["files"],
            "properties": {"files": {
                "type": "array", "items": {"type": "string", "format": "binary"},
                "description": f"One or more images (PNG, JPEG, TIFF, BMP...), at most "
                               f"{MAX_FILES}."}},
        }}},
    },
}


def _errors(**codes: str) -> dict[int | str, dict[str, Any]]:
    return {int(code[1:]): {"model": ErrorBody, "description": text}
            for code, text in codes.items()}


# ----------------------------------------------------------------------------- helpers


class _Refused(Exception):
    """A request answered with an error status; the message says what to change."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class _Upload:
    name: str
    data: bytes


class _Gate:
    """Bounds the work in the server: ``concurrency`` requests run, ``max_queue`` wait.

    A request is admitted (counted) before its body is read, so at most
    ``concurrency + max_queue`` uploads are held in memory at once; past that, requests are
    refused with 503 instead of piling up.
    """

    def __init__(self, concurrency: int, max_queue: int):
        self.concurrency, self.max_queue = concurrency, max_queue
        self.admitted = 0
        self.running = 0
        self.seconds = 1.0  # running mean of the time a request takes, for Retry-After
        self._slots = asyncio.Semaphore(concurrency)

    @property
    def waiting(self) -> int:
        """Requests admitted and not running: reading their upload or waiting for a slot."""
        return self.admitted - self.running

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, at the recent pace."""
        return max(1, math.ceil(self.seconds * (self.waiting + 1) / self.concurrency))

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Counts the request in for its whole life, or refuses it with 503."""
        if self.admitted >= self.concurrency + self.max_queue:
            after = self.retry_after()
            raise _Refused(503, f"the server is busy ({self.running} request(s) running, "
                                f"{self.waiting} waiting, queue limit {self.max_queue}); try "
                                f"again in {after} s.", {"Retry-After": str(after)})
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Waits for a turn to run (first come, first served)."""
        async with self._slots:
            self.running += 1
            start = time.perf_counter()
            try:
                yield
            finally:
                self.running -= 1
                self.seconds = 0.8 * self.seconds + 0.2 * (time.perf_counter() - start)


def _png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _clean_name(filename: str | None, i: int) -> str:
    # Browsers send a bare name; other clients may send a path, which is nobody's business.
    name = Path((filename or "").replace("\\", "/")).name
    return name or f"file {i + 1}"


def _serving_versions() -> dict[str, str]:
    import fastapi
    import PIL
    import torch
    import torchvision

    return {"bcd": __version__, "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "fastapi": fastapi.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


# ----------------------------------------------------------------------------- model card


def read_report(path: str | Path) -> EvaluationResult:
    """Reads the ``metrics.json`` that ``bcd evaluate`` writes.

    Raises:
        UserError: missing file, or not a metrics.json of ``bcd evaluate``.
    """
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such report; pass the metrics.json written by "
                        "`bcd evaluate`.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a metrics.json from `bcd evaluate` ({e}).") from e
    if not isinstance(report, dict) or "image" not in report:
        raise UserError(f"{path}: not a metrics.json from `bcd evaluate` (no 'image' metrics).")
    try:
        return EvaluationResult.from_json(report)
    except (UserError, TypeError) as e:
        raise UserError(f"{path}: not a complete metrics.json from `bcd evaluate` ({e}).") from e


def _evaluation(report: EvaluationResult, predictor: Predictor) -> dict[str, Any]:
    """The part of an evaluation report that belongs on the card, checked against the model.

    Raises:
        UserError: the report is of a model trained on another split, or another architecture.
    """
    ckpt = predictor.checkpoint
    pairs = (("split", report.checkpoint.split_hash, ckpt.split_hash if ckpt else None),
             ("architecture", report.checkpoint.arch, predictor.arch))
    for what, theirs, ours in pairs:
        if theirs is not None and ours is not None and theirs != ours:
            raise UserError(f"the evaluation report is of another model (its {what} is "
                            f"{theirs}, the checkpoint's {ours}); pass the metrics.json that "
                            "`bcd evaluate` wrote for this checkpoint.")
    caveats = list(report.caveats)
    used = report.threshold.get("value")
    if used is not None and abs(float(used) - predictor.threshold) > 1e-6:
        caveats.append(f"These metrics were computed at threshold {float(used):.4f}; this "
                       f"server answers at {predictor.threshold:.4f}. Threshold-free metrics "
                       "(AUC, PR AUC) still apply.")
    alpha = report.bootstrap.get("alpha")
    return {
        "subset": report.subset,
        "images": report.counts.get("images"),
        "patients": report.counts.get("patients"),
        "image": report.image,
        "patient": report.patient,
        "calibration": report.calibration,
        "ci": report.ci,
        "ci_level": None if alpha is None else 1 - float(alpha),
        "bootstrap": report.bootstrap,
        "threshold": report.threshold,
        "same_split_as_training": report.same_split_as_training,
        "leakage": report.leakage,
        "protocol": report.protocol,
        "caveats": caveats,
        "created": report.created,
    }


def model_card(predictor: Predictor, report: EvaluationResult | None = None) -> dict[str, Any]:
    """What the model is, what it was trained and tested on, and what it is for.

    Read from the checkpoint the predictor was loaded from; test-set metrics with confidence
    intervals come from ``report`` (a ``bcd evaluate`` metrics.json).

    Args:
        predictor: The loaded model.
        report: The evaluation report of this checkpoint, or None.

    Returns:
        The card as plain JSON values (NaN as null).

    Raises:
        UserError: ``report`` is of another model.
    """
    ckpt = predictor.checkpoint
    cfg = ckpt.config if ckpt is not None else {}
    pre = predictor.pre
    patients = {subset: len(ids) for subset, ids in (ckpt.split_patients if ckpt else {}).items()}
    evaluation = _evaluation(report, predictor) if report is not None else None
    resize = (f"short side resized to {pre.resize} px, centre {pre.size} px crop"
              if pre.resize else f"resized to {pre.size} x {pre.size} px")
    threshold_info = {k: v for k, v in (ckpt.threshold_info if ckpt else {}).items()
                      if k not in ("value", "source")}
    card = {
        "name": f"breast_cancer_detection {predictor.arch}",
        "architecture": predictor.arch,
        "backend": predictor.backend,
        "classes": predictor.classes,
        "preprocessing": {**pre.to_dict(), "description": (
            f"RGB, {resize}, normalised with mean {', '.join(f'{m:g}' for m in pre.mean)} and "
            f"std {', '.join(f'{v:g}' for v in pre.std)}")},
        "training": {
            "data": cfg.get("data"),
            "split": cfg.get("split") or "made by `bcd train`, saved as split.csv in the run "
                                         "folder",
            "split_hash": ckpt.split_hash if ckpt else None,
            "group_by": cfg.get("group_by"),
            "patients": patients,
            "magnification": cfg.get("magnification") or "all",
            "pretrained": cfg.get("pretrained"),
            "epochs": cfg.get("epochs"),
            "best_epoch": ckpt.best_epoch if ckpt else None,
            "created": ckpt.created if ckpt else None,
        },
        "metrics": {
            "validation": (ckpt.metrics if ckpt else None) or None,
            "evaluation": evaluation,
            "note": None if evaluation else (
                "No test-set evaluation was given: the validation figures chose the epoch and "
                "are optimistic. Run `bcd evaluate CKPT` and serve with --report "
                "reports/.../metrics.json for test metrics with 95% confidence intervals."),
        },
        "threshold": {"value": predictor.threshold, "source": predictor.threshold_source,
                      **threshold_info},
        "intended_use": INTENDED_USE,
        "versions": {"training": ckpt.versions if ckpt else None,
                     "serving": _serving_versions()},
    }
    return jsonable(card)


# ----------------------------------------------------------------------------- the service


class _Service:
    """The loaded model and the work of one request, run in a worker thread."""

    def __init__(self, *, max_upload_mb: float, max_pixels: int | None,
                 report: EvaluationResult | None):
        self.max_upload_mb = max_upload_mb
        self.max_bytes = int(max_upload_mb * 1024 * 1024)
        self.max_pixels = max_pixels
        self.report = report
        self.predictor: Predictor | None = None
        self.card: dict[str, Any] = {}
        # Grad-CAM hooks the shared model; a forward pass of another request in between
        # would mix their activations. Model calls therefore take turns; decoding and
        # encoding do not.
        self._model_lock = threading.Lock()

    def load(self, predictor: Predictor) -> None:
        self.card = model_card(predictor, self.report)
        self.predictor = predictor

    @property
    def arch(self) -> str:
        return self.predictor.arch if self.predictor else ""

    def _limit(self) -> int | None:
        return self.max_pixels if self.max_pixels is not None else self.predictor.max_pixels

    def decode(self, upload: _Upload) -> Image.Image:
        """The upload as RGB, or the error status that says why not."""
        if not upload.data:
            raise _Refused(415, f"{upload.name}: the file is empty; upload an image.")
        buf = io.BytesIO(upload.data)
        buf.name = upload.name  # open_rgb's messages name the file
        try:
            return open_rgb(buf, max_pixels=self._limit())
        except ImageError as e:
            cause = e.__cause__
            if isinstance(cause, UnidentifiedImageError):
                kind = next((k for sig, k in _SIGNATURES.items()
                             if upload.data.startswith(sig)), None)
                if kind is None:
                    raise _Refused(415, f"{upload.name}: not an image this server can read; "
                                        "upload a PNG, JPEG, TIFF or BMP file.") from e
                raise _Refused(400, f"{upload.name}: starts like a {kind} file but cannot be "
                                    "read; it is corrupt. Upload the original image.") from e
            if isinstance(cause, OSError) and not isinstance(cause, Image.DecompressionBombError):
                raise _Refused(400, f"{upload.name}: corrupt or truncated image, cannot be "
                                    f"decoded ({cause}). Upload the original image.") from e
            raise _Refused(400, str(e)) from e  # too many pixels: the message says the limit

    def run(self, uploads: list[_Upload]) -> dict[str, Any]:
        """Predicts and explains every upload; any bad one refuses the whole request."""
        start = time.perf_counter()
        predictor = self.predictor
        images = [self.decode(u) for u in uploads]  # all checked before any model work
        with self._model_lock:
            predictions = predictor.predict(images)
            for upload, p in zip(uploads, predictions):
                if p.error is not None:
                    raise _Refused(400, f"{upload.name}: {p.error}")
            cams = [explain(predictor, image, target=predictor.classes.index(p.label))
                    if predictor.backend == "torch" else None
                    for image, p in zip(images, predictions)]
        results = []
        for upload, image, p, cam in zip(uploads, images, predictions, cams):
            tile_map = None
            if p.heatmap is not None:
                preview = image.copy()
                preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
                tile_map = _png_data_url(overlay(preview, p.heatmap, alpha=0.4,
                                                 cmap="RdYlGn_r"))
            results.append({
                "name": upload.name, "label": p.label, "p_malignant": p.p_malignant,
                "probabilities": p.probabilities, "threshold": p.threshold,
                "threshold_source": predictor.threshold_source, "tiles": p.tiles,
                "heatmap": None if p.heatmap is None else p.heatmap.tolist(),
                "width": image.width, "height": image.height,
                "cam": None if cam is None else _png_data_url(overlay(*cam)),
                "tile_heatmap": tile_map,
            })
        return {"results": results, "model": self.arch,
                "seconds": time.perf_counter() - start}


async def _read_uploads(request: Request, max_bytes: int, max_mb: float) -> list[_Upload]:
    """The files of a multipart request, refusing it as soon as it passes ``max_bytes``."""
    too_large = _Refused(413, f"the upload is larger than the {max_mb:g} MB limit; send "
                              "fewer or smaller images, or raise the limit (bcd serve "
                              "--max-upload-mb).")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_large  # refused before a byte of the body is read
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise _Refused(415, "send the images as multipart/form-data, in the field 'files'.")
    received = 0

    async def counting_receive():
        # Content-Length can be absent (chunked) or wrong: count what actually arrives.
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise too_large
        return message

    try:
        form = await Request(request.scope, counting_receive).form(
            max_files=MAX_FILES, max_fields=MAX_FILES)
    except StarletteHTTPException as e:  # Starlette's answer to malformed multipart data
        raise _Refused(400, f"malformed upload: {e.detail}") from e
    try:
        files = form.getlist("files")
        if not files:
            raise _Refused(422, "no files: send one or more images in the multipart field "
                                "'files'.")
        if not all(isinstance(f, UploadFile) for f in files):
            raise _Refused(422, "the field 'files' must hold file uploads, not text.")
        return [_Upload(_clean_name(f.filename, i), await f.read())
                for i, f in enumerate(files)]
    finally:
        await form.close()


def create_app(predictor: Predictor | None = None, *, checkpoint: str | Path | None = None,
               device: str = "auto", report: str | Path | EvaluationResult | None = None,
               max_upload_mb: float = 20, max_concurrency: int = 1, max_queue: int = 8,
               max_pixels: int | None = None) -> FastAPI:
    """Builds the web app: the page at ``/``, the API under ``/api``, OpenAPI at ``/docs``.

    Give a loaded ``predictor`` (used as it is), or a ``checkpoint`` to load once when the
    server starts. Inference runs in worker threads, ``max_concurrency`` requests at a time;
    up to ``max_queue`` more wait, and past that requests get 503 with ``Retry-After``.

    A request may carry several files. They are all read and checked before any model work,
    and one bad file refuses the whole request with its status (413, 415 or 400) and a
    message naming it; the page sends one request per file, so each gets its own answer.

    Args:
        predictor: A loaded Predictor.
        checkpoint: Path or URL of a checkpoint, loaded at start-up instead.
        device: Where a ``checkpoint`` runs: ``auto``, ``cpu``, ``cuda``...
        report: The ``metrics.json`` of ``bcd evaluate`` for this checkpoint (path, dict or
            :class:`EvaluationResult`):
            the model card then shows test metrics with confidence intervals.
        max_upload_mb: Largest request body, in MiB (413 beyond).
        max_concurrency: Requests processed at once.
        max_queue: Requests allowed to wait for a turn (503 beyond).
        max_pixels: Refuse larger images before decoding (400); None keeps the predictor's
            limit.

    Raises:
        UserError: neither or both of ``predictor`` and ``checkpoint``, a bad limit, or a
            report of another model.
    """
    if (predictor is None) == (checkpoint is None):
        raise UserError("create_app needs a predictor or a checkpoint (one of the two).")
    if not max_upload_mb > 0:
        raise UserError(f"max_upload_mb={max_upload_mb} must be positive.")
    if max_concurrency < 1:
        raise UserError(f"max_concurrency={max_concurrency} must be at least 1.")
    if max_queue < 0:
        raise UserError(f"max_queue={max_queue} must be 0 or more.")
    if isinstance(report, (str, Path)):
        report = read_report(report)
    elif isinstance(report, dict):
        report = EvaluationResult.from_json(report)
    service = _Service(max_upload_mb=max_upload_mb, max_pixels=max_pixels, report=report)
    if predictor is not None:
        service.load(predictor)
    gate = _Gate(max_concurrency, max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if service.predictor is None:
            kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
            loaded = await run_in_threadpool(Predictor.from_checkpoint, checkpoint,
                                             device=device, progress=False, **kwargs)
            service.load(loaded)
        yield

    app = FastAPI(
        title="Breast cancer detection",
        version=__version__,
        summary="Benign vs malignant H&E histopathology images, with Grad-CAM. A research "
                "tool, not a medical device.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.gate = gate

    @app.exception_handler(_Refused)
    async def refused(request: Request, exc: _Refused) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, exc.status, headers=exc.headers)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if not request.url.path.startswith(("/docs", "/redoc")):
            response.headers.setdefault("Content-Security-Policy", _CSP)
        return response

    @app.get("/api/health", response_model=Health, tags=["service"])
    async def health() -> Health:
        """The service is up; which model answers, and how busy it is."""
        p = service.predictor
        return Health(status="ok", model=service.arch, backend=p.backend, device=str(p.device),
                      threshold=p.threshold, version=__version__,
                      max_upload_mb=service.max_upload_mb, max_concurrency=gate.concurrency,
                      max_queue=gate.max_queue, running=gate.running, waiting=gate.waiting)

    @app.get("/api/model", tags=["model"])
    async def model() -> dict[str, Any]:
        """The model card: architecture, training data and split, metrics (with confidence
        intervals when an evaluation report was given), threshold, intended use."""
        return service.card

    @app.post("/api/predict", response_model=PredictResponse, tags=["model"],
              openapi_extra=_MULTIPART,
              responses=_errors(
                  _400="Corrupt, truncated or over-large (decompression bomb) image, or "
                       "malformed upload.",
                  _413="Upload over the size limit.",
                  _415="A file that is not an image, or a body that is not multipart.",
                  _422="No files in the field 'files'.",
                  _503="Queue full; retry after the Retry-After header's seconds."))
    async def predict(request: Request) -> dict[str, Any]:
        """Label, P(malignant), threshold and Grad-CAM overlay for each uploaded image.

        Send one or more images as ``multipart/form-data`` in the field ``files``. They are
        all checked before any is predicted; one bad file refuses the request, with a
        message naming it.
        """
        async with gate.admit():
            uploads = await _read_uploads(request, service.max_bytes, service.max_upload_mb)
            async with gate.slot():
                return await run_in_threadpool(service.run, uploads)

    app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    return app

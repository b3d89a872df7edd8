"""The web service: the prediction API and the page, around one loaded Predictor."""

from __future__ import annotations

import asyncio
import base64
import csv
import functools
import io
import ipaddress
import json
import logging
import math
import os
import platform
import re
import threading
import time
import warnings
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.message import Message
from pathlib import Path, PureWindowsPath
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..config import check_backend
from ..data.datasets import ALLOWED_FORMATS, ImageError, ImageFormatError, open_rgb
from ..errors import UserError
from ..explain import explain, overlay
from ..files import jsonable, unguard_cell
from ..inference import DEFAULT_TILE_FACTOR, NON_FINITE, Predictor, tile_starts
from ..plots import HEATMAP_CMAP
from ..results import EvaluationResult
from .limits import CONNECTION_HEADROOM, MAX_FILES, TILE_UNIT, ServeLimits  # noqa: F401

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
"""The page: plain HTML, JavaScript and CSS, served as they are."""

PREVIEW_SIDE = 1024
"""Long side, in pixels, of the tile heat map picture sent back for a large image."""

_DEFAULTS = ServeLimits()
MAX_REQUEST_MEGAPIXELS = _DEFAULTS.max_request_megapixels
MAX_REQUEST_TILES = _DEFAULTS.max_request_tiles
UPLOAD_TIMEOUT = _DEFAULTS.upload_timeout
MAX_UPLOADS = _DEFAULTS.max_uploads
HEADER_TIMEOUT = _DEFAULTS.header_timeout

LOCAL_NAMES = ("localhost",)
"""Host names answered to besides IP addresses and ``allowed_hosts``."""

SLIDE_FILES = {"heatmap.png": "image/png", "tissue.png": "image/png",
               "top_tiles.png": "image/png", "regions.geojson": "application/geo+json",
               "tiles.csv": "text/csv; charset=utf-8"}
"""The files of a slide's ``bcd slide`` folder that are served, and their media types
(slide.json is not: it records the slide's local path)."""

TOP_REGIONS = 5
"""Largest regions of a slide listed by /api/slides."""

REGIONS_MAX_BYTES = 8 << 20
"""A regions.geojson larger than this is not read for the listing (its row says so); the file
itself is still served. ``bcd slide`` writes a few kB for a slide of hundreds of regions."""

# The page loads nothing from elsewhere; the browser enforces it. /docs is left out: FastAPI's
# Swagger UI loads its script from a CDN.
_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

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
        description="Grad-CAM of the label's class laid over the image at its own aspect "
                    "(viridis: dark purple low, yellow high; parts no model input showed "
                    "are left uncoloured), as a data:image/png;base64 URL; computed with "
                    "PyTorch, it explains the label the scoring backend gave; null when only "
                    "an ONNX model is loaded (no gradients).")
    tile_heatmap: str | None = Field(
        description="For a tiled image, the tile heat map over the image (cividis: dark "
                    "blue low P(malignant), yellow high) as a PNG data URL; else null.")
    warning: str | None = Field(
        description="Why this image lies outside what the model was made for (its scale, "
                    "its tiling, its name), or null.")


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
    max_uploads: int
    upload_timeout: float
    max_request_megapixels: float
    max_request_tiles: int
    running: int = Field(description="Requests being answered now.")
    waiting: int = Field(description="Requests admitted and waiting for their turn.")
    uploading: int = Field(description="Requests still sending their body.")
    slides: bool = Field(description="Whether /api/slides shows the results of `bcd slide` "
                                     "(bcd serve --slides DIR).")


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


class _ClientGone(Exception):
    """The client closed the connection; nobody will read an answer."""


@dataclass
class _Upload:
    name: str
    data: bytes


class _Gate:
    """Bounds the work in the server: ``concurrency`` requests run, ``max_queue`` wait, and
    ``max_uploads`` more may be sending their body.

    A request joins the model queue only once its body has arrived, so clients that send
    slowly, or stall, hold an upload place (for at most the upload timeout) and never a
    model slot or a queue place: at most ``concurrency + max_queue`` complete uploads are
    held in memory. Past either bound, requests are refused with 503 instead of piling up.
    """

    def __init__(self, concurrency: int, max_queue: int, max_uploads: int = MAX_UPLOADS):
        self.concurrency, self.max_queue, self.max_uploads = concurrency, max_queue, max_uploads
        self.admitted = 0
        self.running = 0
        self.uploading = 0
        self.seconds = 1.0  # running mean of the time a request takes, for Retry-After
        self._slots = asyncio.Semaphore(concurrency)

    @property
    def waiting(self) -> int:
        """Requests with their body read, waiting for a slot."""
        return self.admitted - self.running

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, at the recent pace."""
        return max(1, math.ceil(self.seconds * (self.waiting + 1) / self.concurrency))

    @asynccontextmanager
    async def upload(self, timeout: float) -> AsyncIterator[None]:
        """Counts a request in while its body arrives, or refuses it with 503."""
        if self.uploading >= self.max_uploads:
            after = max(1, math.ceil(timeout / 2))
            raise _Refused(503, f"the server is busy receiving {self.uploading} other "
                                f"upload(s) (limit {self.max_uploads}); try again in {after} s, "
                                "or raise the limit (bcd serve --max-uploads).",
                           {"Retry-After": str(after)})
        self.uploading += 1
        try:
            yield
        finally:
            self.uploading -= 1

    def refuse_if_full(self) -> None:
        """503 when the queue is full: before a body is read (so a client is not made to send
        megabytes only to be refused), and again when it has arrived."""
        if self.admitted >= self.concurrency + self.max_queue:
            after = self.retry_after()
            raise _Refused(503, f"the server is busy ({self.running} request(s) running, "
                                f"{self.waiting} waiting, queue limit {self.max_queue}); try "
                                f"again in {after} s.", {"Retry-After": str(after)})

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Counts the request in for its whole life, or refuses it with 503."""
        self.refuse_if_full()
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


_ABSOLUTE = re.compile(r"^(~|/|file:|[A-Za-z]:[\\/]|\\\\|\.\.?[\\/])")  # and ./ ../


def _without_local_paths(x: Any) -> Any:
    """``x`` with every absolute local path (or one relative to ``.`` or ``..``) replaced by
    its last part.

    The model card records where the model was trained (data folder, split file); over the
    network that tells strangers this machine's user names and folder layout.
    """
    if isinstance(x, dict):
        return {k: _without_local_paths(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_without_local_paths(v) for v in x]
    if isinstance(x, str) and _ABSOLUTE.match(x):
        return PureWindowsPath(x.removeprefix("file:")).name or "(local path)"
    return x


_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
"""Methods that change nothing: the cross-site check spares them."""


def _host_name(host: str) -> str:
    """The name or address of a Host header, without port, brackets or trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _Guard:
    """Refuses Host headers the server does not answer to (or none), and uploads sent by other
    sites' pages (:meth:`_cross_site`); adds the security headers.

    DNS rebinding: a web page at evil.example can point its name at 127.0.0.1 and read this
    server from the victim's browser, which sends ``Host: evil.example``. A Host that is an
    IP address cannot be rebound (the page would have to come from that address), so IP
    addresses, ``localhost`` and the names given are answered; anything else gets 400.
    A plain ASGI middleware, not Starlette's BaseHTTPMiddleware, so that the endpoint's
    ``receive`` still reports a client that disconnects.
    """

    def __init__(self, app, allowed_hosts: Iterable[str]):
        self.app = app
        names = {_host_name(h) for h in allowed_hosts}
        self.any_host = "*" in names
        self.names = names | set(LOCAL_NAMES)

    def allows(self, host: str) -> bool:
        name = _host_name(host)
        return self.any_host or name in self.names or _is_ip(name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                # Image names and answers must not leak to other sites through links.
                headers.setdefault("Referrer-Policy", "no-referrer")
                if path.startswith("/api/"):
                    # Predictions are about someone's tissue: no copy in any cache.
                    headers["Cache-Control"] = "no-store"
                if not path.startswith(("/docs", "/redoc")):
                    headers.setdefault("Content-Security-Policy", _CSP)
            await send(message)

        headers = {k: v.decode("latin-1") for k, v in scope.get("headers", [])
                   if k in (b"host", b"origin", b"sec-fetch-site")}
        host = headers.get(b"host", "")
        refusal = None
        if not _host_name(host):
            refusal = JSONResponse({"detail": (
                "the request has no Host header: send one naming this server, as browsers "
                "and HTTP clients do (Host: 127.0.0.1:8000, for one).")}, 400)
        elif not self.allows(host):
            name = _host_name(host)
            refusal = JSONResponse({"detail": (
                f"the Host header {name!r} is not a name this server answers to (it answers "
                "to IP addresses, localhost and the names given with --allowed-hosts; a guard "
                "against DNS rebinding). If that name is this machine's, start it with "
                f"`bcd serve ... --allowed-hosts {name}` (comma-separated; '*' turns the "
                "check off).")}, 400)
        elif scope.get("method") not in _SAFE_METHODS:
            refusal = self._cross_site(f"{scope.get('scheme', 'http')}://{host}/",
                                       host, headers.get(b"origin"),
                                       headers.get(b"sec-fetch-site"))
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def _cross_site(self, page: str, host: str, origin: str | None, fetch_site: str | None
                    ) -> JSONResponse | None:
        """403 for a request that changes something (an upload) sent by another site's page.

        A page elsewhere can make the visitor's browser post a form here (it cannot read the
        answer, but the upload costs model time, and it can probe the server). Browsers say
        where such a request comes from: ``Sec-Fetch-Site: cross-site``, and an ``Origin``
        whose host is not this one. An Origin is accepted when its host is the Host header's
        (the page itself) or one of ``allowed_hosts`` (a proxy in front that rewrites Host);
        clients other than browsers send neither header.
        """
        if (fetch_site or "").strip().lower() == "cross-site":
            return JSONResponse({"detail": (
                "cross-site request refused: the browser says it comes from another site's "
                f"page, and this server takes uploads only from its own; open {page} and "
                "upload there.")}, 403)
        if origin is None:
            return None
        netloc = urlsplit(origin.strip()).netloc if origin.strip() != "null" else ""
        name = _host_name(netloc.rpartition("@")[2])
        if name and (self.any_host or name == _host_name(host)
                     or name in self.names - set(LOCAL_NAMES)):
            return None
        proxy = (f" If {name} is this server's own name (behind a proxy), start it with "
                 f"`bcd serve ... --allowed-hosts {name}`." if name else "")
        return JSONResponse({"detail": (
            f"cross-site request refused: it comes from the page of {origin.strip()!r}, and "
            f"this server takes uploads only from its own page; open {page} and upload "
            f"there.{proxy}")}, 403)


def _serving_versions() -> dict[str, str]:
    import fastapi
    import PIL
    import torch
    import torchvision

    return {"bcd": __version__, "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "fastapi": fastapi.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


# ----------------------------------------------------------------------------- connections


@functools.cache
def head_deadline_protocol(seconds: float) -> type:
    """Uvicorn's h11 protocol, closing every connection that has not sent a complete request
    head within ``seconds`` of opening, or of the end of its previous answer (keep-alive).

    Uvicorn bounds the wait for a request only while no byte arrives (its keep-alive timer,
    from the end of an answer); nothing bounds the time to receive a request head, so idle
    or trickling connections would hold their sockets, and file descriptors, for ever. For
    ``uvicorn.run(http=...)``; :func:`uvicorn_options` passes it.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineProtocol(H11Protocol):
        head_timeout = seconds

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._head_timer: asyncio.TimerHandle | None = None
            self._waiting_after = None  # the request whose answer the timer runs after

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._disarm_if_head_arrived()

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._arm()  # before a pipelined request waiting in the buffer is started
            super().on_response_complete()
            self._disarm_if_head_arrived()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._waiting_after = self.cycle
            self._head_timer = self.loop.call_later(self.head_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _disarm_if_head_arrived(self) -> None:
            # uvicorn starts a new cycle for each request head it has parsed whole.
            if self._head_timer is not None and self.cycle is not self._waiting_after:
                self._disarm()

        def _timed_out(self) -> None:
            self._head_timer = None
            # A connection upgraded to another protocol is no longer this one's business.
            if (self.transport.is_closing() or self.cycle is not self._waiting_after
                    or self.transport.get_protocol() is not self):
                return
            log.debug("closed a connection from %s: no complete request head within %g s.",
                      "{}:{}".format(*self.client) if self.client else "a client", seconds)
            self.transport.close()

    HeadDeadlineProtocol.__qualname__ = HeadDeadlineProtocol.__name__
    return HeadDeadlineProtocol


def uvicorn_options(app: FastAPI, header_timeout: float = HEADER_TIMEOUT) -> dict[str, Any]:
    """The settings ``uvicorn.run`` needs to bound connections as the app bounds requests.

    ``http``: :func:`head_deadline_protocol`, which closes connections that send no complete
    request head within ``header_timeout`` seconds. ``limit_concurrency``: the app's upload,
    model and queue places plus :data:`CONNECTION_HEADROOM`; past it uvicorn answers 503 at
    once instead of accepting connections until the process runs out of file descriptors.

    Raises:
        UserError: ``header_timeout`` not positive.
    """
    if not header_timeout > 0 or not math.isfinite(header_timeout):
        raise UserError(f"header_timeout={header_timeout} must be a positive number of "
                        "seconds (bcd serve --header-timeout).")
    gate: _Gate = app.state.gate
    connections = gate.max_uploads + gate.concurrency + gate.max_queue + CONNECTION_HEADROOM
    return {"http": head_deadline_protocol(float(header_timeout)),
            "limit_concurrency": connections}


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


def model_card(predictor: Predictor, report: EvaluationResult | None = None, *,
               scorer: Predictor | None = None) -> dict[str, Any]:
    """What the model is, what it was trained and tested on, and what it is for.

    Read from the checkpoint the predictor was loaded from; test-set metrics with confidence
    intervals come from ``report`` (a ``bcd evaluate`` metrics.json).

    Args:
        predictor: The loaded model.
        report: The evaluation report of this checkpoint, or None.
        scorer: The same model on the backend that scores the images, when that is not
            ``predictor`` (:meth:`Predictor.on_backend`).

    Returns:
        The card as plain JSON values (NaN as null).

    Raises:
        UserError: ``report`` is of another model.
    """
    ckpt = predictor.checkpoint
    cfg = ckpt.config if ckpt is not None else {}
    pre = predictor.pre
    # Counts of patients only where the data had patient ids (PCam has none: no zeros).
    patients = {subset: len(ids) for subset, ids in (ckpt.split_patients if ckpt else {}).items()
                if ids}
    evaluation = _evaluation(report, predictor) if report is not None else None
    tile = pre.resize or pre.size
    resize = (f"short side resized to {pre.resize} px, centre {pre.size} px crop"
              if pre.resize else f"resized to {pre.size} x {pre.size} px") + (
        f"; an image whose short side is over {DEFAULT_TILE_FACTOR * tile:g} px is cut "
        f"instead into {tile} px tiles (overlapping by half) at its own scale, each tile "
        "prepared so, and the tile answers averaged")
    threshold_info = {k: v for k, v in (ckpt.threshold_info if ckpt else {}).items()
                      if k not in ("value", "source", "val_patient_ids")}
    if ckpt and ckpt.threshold_info.get("val_patient_ids"):  # counts only, as for the split
        threshold_info["val_patients"] = len(ckpt.threshold_info["val_patient_ids"])
    card = {
        "name": f"breast_cancer_detection {predictor.arch}",
        "architecture": predictor.arch,
        "backend": (scorer or predictor).backend,
        "backend_note": (scorer or predictor).backend_note,
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
        # The model's own words (its registry entry for a named model): the page shows them.
        **predictor.scope(),
        "trained_model": (predictor.trained_model.card()
                          if getattr(predictor, "trained_model", None) else None),
        "versions": {"training": ckpt.versions if ckpt else None,
                     "serving": _serving_versions()},
    }
    return jsonable(card)


# ----------------------------------------------------------------------------- whole slides

# An absolute path inside a message: POSIX (not after a word, as in "and/or", nor in a URL),
# home, Windows drive or UNC share, or a file: URL; up to the next space or quote.
_PATH_IN_TEXT = re.compile(r"(?:file:)?(?:(?<![\w.:/])/|~/|\b[A-Za-z]:[\\/]|\\\\)[^\s'\"]*")


def _slide_name(slide: str) -> str:
    """The file name of a slide given as a path (POSIX or Windows)."""
    return PureWindowsPath(slide.removeprefix("file:")).name or "(slide)"


def _without_paths_in(text: str, slide: str) -> str:
    """``text`` with the slide's path and any other absolute path cut to their last part."""
    if slide:
        text = text.replace(slide, _slide_name(slide))
    return _PATH_IN_TEXT.sub(lambda m: PureWindowsPath(m[0].removeprefix("file:")).name, text)


def _number(text: Any, kind: type = float) -> float | int | None:
    """A CSV cell as a finite number, or None (empty, NaN, not a number)."""
    try:
        x = float(text)
    except (TypeError, ValueError):
        return None
    return kind(x) if math.isfinite(x) else None


class _Slides:
    """The results of ``bcd slide --out DIR``, read again whenever slides.csv changes, so that
    a run still going shows each slide as it finishes.

    Only what ``slides.csv`` lists is served: a file of :data:`SLIDE_FILES`, in a folder named
    in the table that is, once links are resolved, a direct child of DIR. The table and the
    listing are kept while slides.csv and DIR stay as they were (same file, size and times),
    so that a listing of thousands of slides is not rebuilt on every request.
    """

    SETTLED_NS = 2_000_000_000
    """A slides.csv changed less than this long ago (ns) is read afresh every time: a file
    rewritten within its file system's timestamp granularity keeps its modification time."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--slides {root}: not a folder; give the --out folder of "
                            "`bcd slide SLIDE... --out DIR`.")
        if not (self.root / "slides.csv").is_file():
            log.warning("%s has no slides.csv yet; run `bcd slide SLIDE... --out %s`.",
                        self.root, root)
        # (stamp, value): replaced whole, so threads answering at once see one or the other.
        self._table: tuple[Any, tuple[list[dict[str, str]], str | None, frozenset[str]]] | \
            None = None
        self._listing: tuple[Any, dict[str, Any]] | None = None
        self._building = threading.Lock()
        self._fresh: tuple[float, dict[str, Any]] | None = None  # (build start, listing)

    def _stamp(self) -> tuple[int, ...] | None:
        """What identifies this version of slides.csv and of DIR's entries, or None when
        slides.csv is missing or too recent to be told from its next version."""
        try:
            csv_stat, dir_stat = os.stat(self.root / "slides.csv"), os.stat(self.root)
        except OSError:
            return None
        # Recent: within SETTLED_NS before now. A time in the future (a skewed clock, a
        # touched file) is no reason never to cache: a rewrite now would change the stamp.
        age = time.time_ns() - max(csv_stat.st_mtime_ns, csv_stat.st_ctime_ns,
                                   dir_stat.st_mtime_ns)
        if 0 <= age < self.SETTLED_NS:
            return None
        return (csv_stat.st_dev, csv_stat.st_ino, csv_stat.st_size, csv_stat.st_mtime_ns,
                csv_stat.st_ctime_ns, dir_stat.st_mtime_ns)

    def table(self) -> tuple[list[dict[str, str]], str | None]:
        """The rows of slides.csv, or none and why."""
        try:
            with open(self.root / "slides.csv", newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                # Cells guarded against spreadsheets (bcd slide writes '=x.tif) read as written.
                rows = [{k: unguard_cell(v) for k, v in row.items()} for row in reader]
                columns = set(reader.fieldnames or ())
        except FileNotFoundError:
            return [], ("no slides analysed yet: run `bcd slide SLIDE... --out DIR` with the "
                        "DIR this server was started with (bcd serve --slides DIR); each slide "
                        "shows up here as it is done.")
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            return [], (f"slides.csv could not be read ({type(e).__name__}); run `bcd slide "
                        "SLIDE... --out DIR` again to rewrite it.")
        if not {"slide", "folder"} <= columns:
            return [], ("slides.csv is not one written by `bcd slide` (no 'slide' and "
                        "'folder' columns); run `bcd slide SLIDE... --out DIR` again.")
        return rows, None

    def _read(self, stamp: tuple[int, ...] | None
              ) -> tuple[list[dict[str, str]], str | None, frozenset[str]]:
        """:meth:`table` and the set of its folders, from the last read while ``stamp`` (of
        :meth:`_stamp`) is that read's."""
        cached = self._table
        if stamp is not None and cached is not None and cached[0] == stamp:
            return cached[1]
        rows, message = self.table()
        read = rows, message, frozenset(row.get("folder") or "" for row in rows)
        if stamp is not None:
            self._table = (stamp, read)
        return read

    def file(self, folder: str, name: str, folders: frozenset[str] | None = None
             ) -> Path | None:
        """The path of ``folder/name`` if it may be served, else None. ``folders``: those of
        slides.csv, when the caller has them."""
        if name not in SLIDE_FILES or folder in ("", ".", "..") or any(
                c in folder for c in "/\\\0"):
            return None
        if folders is None:
            folders = self._read(self._stamp())[2]
        if folder not in folders:
            return None
        try:
            # Links are followed, then the real folder must sit directly in DIR and the real
            # file directly in it: a link out of DIR is refused.
            where = (self.root / folder).resolve(strict=True)
            path = (where / name).resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if where.parent != self.root or path.parent != where or not path.is_file():
            return None
        return path

    def _regions(self, path: Path | None
                 ) -> tuple[int | None, list[dict[str, Any]], str | None]:
        """The number of regions in a regions.geojson, the largest few, and a note when the
        file could not be read (too large, malformed, nested too deep): that row's, never
        the listing's failure."""
        if path is None:
            return None, [], None
        try:
            if path.stat().st_size > REGIONS_MAX_BYTES:
                return None, [], (f"regions.geojson is over {REGIONS_MAX_BYTES >> 20} MB: not "
                                  "read for this list (download it, or open it in QuPath)")
            features = json.loads(path.read_text(encoding="utf-8"))["features"]
            props = [f.get("properties") for f in features]
            if not all(isinstance(p, dict) for p in props):
                raise TypeError("a feature's properties are not an object")
            top = sorted(props, key=lambda p: _number(p.get("area_mm2")) or 0, reverse=True)
            return len(props), [{"tiles": _number(p.get("tiles"), int),
                                 "area_mm2": _number(p.get("area_mm2")),
                                 "max_p": _number(p.get("max_p"))} for p in top[:TOP_REGIONS]
                                ], None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            return None, [], (f"regions.geojson is not one `bcd slide` writes "
                              f"({type(e).__name__}); run `bcd slide ... --force` for this "
                              "slide to rewrite it")

    def listing(self) -> dict[str, Any]:
        """One entry per row of slides.csv, with its largest regions and file URLs; built by
        one request at a time: the others wait, and take the one built by a request that
        started building after they arrived (it is at least as new as what they asked for),
        so that requests arriving together right after slides.csv changes cost one build."""
        arrived = time.monotonic()
        with self._building:
            fresh = self._fresh
            if fresh is not None and fresh[0] >= arrived:
                return fresh[1]
            started = time.monotonic()
            listing = self._listing_now()
            self._fresh = (started, listing)
            return listing

    def _listing_now(self) -> dict[str, Any]:
        stamp = self._stamp()
        cached = self._listing
        if stamp is not None and cached is not None and cached[0] == stamp:
            return cached[1]
        rows, message, folders = self._read(stamp)
        slides = []
        for row in rows:
            slide, folder = row.get("slide") or "", row.get("folder") or ""
            paths = {name: self.file(folder, name, folders) for name in SLIDE_FILES}
            files = {name: f"slides/{quote(folder, safe='')}/{name}"
                     for name, path in paths.items() if path is not None}
            count, top, note = self._regions(paths["regions.geojson"])
            slides.append({
                "name": _slide_name(slide), "folder": folder,
                "score": _number(row.get("score")), "tiles": _number(row.get("tiles"), int),
                "tumour_tiles": _number(row.get("tumour_tiles"), int),
                "tissue_mm2": _number(row.get("tissue_mm2")),
                "error": _without_paths_in(row.get("error") or "", slide),
                "regions": count, "largest_regions": top, "files": files, "note": note,
            })
        listing = {"slides": slides, "message": message}
        if stamp is not None:
            self._listing = (stamp, listing)
        return listing


# ----------------------------------------------------------------------------- the service


class _Service:
    """The loaded model and the work of one request, run in a worker thread."""

    def __init__(self, *, max_upload_mb: float, max_pixels: int | None,
                 report: EvaluationResult | None,
                 max_request_megapixels: float = MAX_REQUEST_MEGAPIXELS,
                 max_request_tiles: int = MAX_REQUEST_TILES,
                 upload_timeout: float = UPLOAD_TIMEOUT):
        self.max_upload_mb = max_upload_mb
        self.max_bytes = int(max_upload_mb * 1024 * 1024)
        self.max_pixels = max_pixels
        self.max_request_megapixels = max_request_megapixels
        self.max_request_tiles = max_request_tiles
        self.upload_timeout = upload_timeout
        self.report = report
        self.predictor: Predictor | None = None
        self.scorer: Predictor | None = None
        self.card: dict[str, Any] = {}
        # Grad-CAM hooks the shared model; a forward pass of another request in between
        # would mix their activations. Model calls therefore take turns; decoding and
        # encoding do not.
        self._model_lock = threading.Lock()

    def load(self, predictor: Predictor, backend: str = "torch") -> None:
        """Serves ``predictor``: uploads are scored on ``backend`` (``auto`` picks ONNX Runtime
        on a CPU when it is installed, see :meth:`Predictor.on_backend`), and Grad-CAM runs on
        ``predictor`` itself when that is PyTorch (it needs gradients). An ONNX model is
        served as it is, whatever ``backend`` says."""
        scorer = predictor if backend == "torch" else predictor.on_backend(backend)
        self.card = _without_local_paths(model_card(predictor, self.report, scorer=scorer))
        self.predictor, self.scorer = predictor, scorer

    @property
    def arch(self) -> str:
        return self.predictor.arch if self.predictor else ""

    def _limit(self) -> int | None:
        return self.max_pixels if self.max_pixels is not None else self.predictor.max_pixels

    def _cost(self, width: int, height: int) -> tuple[int, int]:
        """Pixels held and model passes needed for one image, as ``predict`` and ``explain``
        will treat it: decoded, resized whole (short side to the model's resize, the long side
        in proportion, as torchvision does), and cut into tiles when large."""
        pre = self.predictor.pre
        short, long = max(1, min(width, height)), max(width, height)
        view = pre.resize * int(pre.resize * long / short) if pre.resize else pre.size ** 2
        tile = int(pre.resize or pre.size)
        tiles = 1
        if short > DEFAULT_TILE_FACTOR * tile:
            tiles = len(tile_starts(height, tile)) * len(tile_starts(width, tile))
        return width * height + view, tiles

    def check_budget(self, uploads: list[_Upload]) -> tuple[int, int]:
        """Refuses a request whose images would cost too much, reading only their headers.

        Files that Pillow cannot open are let through: :meth:`decode` says why they fail.

        Returns:
            The request's pixels (decoded and resized views) and tiles.

        Raises:
            _Refused: 415 for a format not decoded here, 400 for an image over the per-image
                pixel limit, 413 for a request over the pixel or tile budget.
        """
        limit = self._limit()
        pixels = tiles = 0
        costs = []
        for upload in uploads:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    # Reads the header only, and only of the formats decoded later.
                    with Image.open(io.BytesIO(upload.data), formats=ALLOWED_FORMATS) as im:
                        w, h = im.size
            except Exception:  # noqa: BLE001 - decode() gives such a file its status
                continue
            if limit is not None and w * h > limit:
                raise _Refused(400, f"{upload.name}: {w}x{h} pixels is over the limit of "
                                    f"{limit:,} (a possible decompression bomb); raise the limit "
                                    "(bcd serve --max-pixels) if it is genuine.")
            p, t = self._cost(w, h)
            costs.append((p, t, upload.name, w, h))
            pixels, tiles = pixels + p, tiles + t
        if pixels > self.max_request_megapixels * 1e6:
            p, _, name, w, h = max(costs)
            raise _Refused(413, f"this request's {len(costs)} image(s) come to "
                                f"{pixels / 1e6:.1f} MP (decoded, plus each image resized "
                                f"for the model; the largest, {name}, {w}x{h}, is "
                                f"{p / 1e6:.1f} MP), over the limit of "
                                f"{self.max_request_megapixels:g} MP per request; send fewer or "
                                "smaller images, or raise the limit (bcd serve "
                                "--max-request-megapixels).")
        side = int(self.predictor.pre.resize or self.predictor.pre.size)
        units = tiles * min(1.0, (side / TILE_UNIT) ** 2)
        if units > self.max_request_tiles:
            _, t, name, w, h = max(costs, key=lambda c: c[1])
            as_units = "" if side >= TILE_UNIT else (
                f", as much model work as {units:,.0f} of {TILE_UNIT} px")
            raise _Refused(413, f"this request's images need {tiles} tiles (model passes over "
                                f"{side} px squares at the image's own scale{as_units}; the "
                                f"largest, {name}, {w}x{h}, needs {t}), over the limit of "
                                f"{self.max_request_tiles} per request (a tile of {TILE_UNIT} "
                                "px or more counts one, a smaller one by its area); send fewer "
                                "or smaller images, or raise the limit (bcd serve "
                                "--max-request-tiles).")
        return pixels, tiles

    def decode(self, upload: _Upload) -> Image.Image:
        """The upload as RGB, or the error status that says why not."""
        if not upload.data:
            raise _Refused(415, f"{upload.name}: the file is empty; upload an image.")
        buf = io.BytesIO(upload.data)
        buf.name = upload.name  # open_rgb's messages name the file
        try:
            return open_rgb(buf, max_pixels=self._limit())
        except ImageFormatError as e:
            raise _Refused(415, str(e)) from e  # names the formats accepted
        except ImageError as e:
            cause = e.__cause__
            if isinstance(cause, UnidentifiedImageError):
                raise _Refused(400, str(e)) from e  # starts like an image format: damaged
            if isinstance(cause, OSError) and not isinstance(cause, Image.DecompressionBombError):
                raise _Refused(400, f"{upload.name}: corrupt or truncated image, cannot be "
                                    f"decoded ({cause}). Upload the original image.") from e
            raise _Refused(400, str(e)) from e  # too many pixels: the message says the limit

    def run(self, uploads: list[_Upload], gone: threading.Event | None = None
            ) -> dict[str, Any]:
        """Predicts and explains every upload; any bad one refuses the whole request.

        ``gone`` is set when the client disconnects: the work stops at the next image.
        """
        gone = gone or threading.Event()

        def check() -> None:
            if gone.is_set():
                raise _ClientGone

        start = time.perf_counter()
        predictor = self.predictor
        images = []
        for u in uploads:  # all checked before any model work
            check()
            images.append(self.decode(u))
        predictions, cams = [], []
        with self._model_lock:
            # One image at a time, so that a client that left stops costing model time.
            for upload, image in zip(uploads, images):
                check()
                (p,) = self.scorer.predict([image], names=[upload.name])
                if p.error is not None:
                    # A model that outputs NaN is the server's fault, not the upload's.
                    status = 500 if p.error.startswith(NON_FINITE) else 400
                    raise _Refused(status, f"{upload.name}: {p.error}")
                predictions.append(p)
            for image, p in zip(images, predictions):
                check()
                cams.append(explain(predictor, image, target=predictor.classes.index(p.label))
                            if predictor.backend == "torch" else None)
        results = []
        for upload, image, p, cam in zip(uploads, images, predictions, cams):
            check()
            tile_map = None
            if p.heatmap is not None:
                preview = image.copy()
                preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
                tile_map = _png_data_url(overlay(preview, p.heatmap, alpha=0.4,
                                                 cmap=HEATMAP_CMAP))
            results.append({
                "name": upload.name, "label": p.label, "p_malignant": p.p_malignant,
                "probabilities": p.probabilities, "threshold": p.threshold,
                "threshold_source": predictor.threshold_source, "tiles": p.tiles,
                "heatmap": None if p.heatmap is None else p.heatmap.tolist(),
                "width": image.width, "height": image.height,
                "cam": None if cam is None else _png_data_url(overlay(*cam)),
                "tile_heatmap": tile_map, "warning": p.warning,
            })
        return {"results": results, "model": self.arch,
                "seconds": time.perf_counter() - start}


def _closing_delimiter(content_type: str) -> bytes | None:
    """``--BOUNDARY--`` of a multipart Content-Type, or None without a boundary (which the
    multipart parser refuses)."""
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        return None
    return b"--" + boundary.encode("latin-1", "replace") + b"--"


async def _read_uploads(request: Request, max_bytes: int, max_mb: float,
                        timeout: float = UPLOAD_TIMEOUT) -> list[_Upload]:
    """The files of a multipart request, refusing it as soon as it passes ``max_bytes``, or
    ``timeout`` seconds.

    Raises:
        _Refused: 408, 413, 415, 400 or 422, with a message.
        _ClientGone: the client disconnected before sending the whole body.
    """
    too_large = _Refused(413, f"the upload is larger than the {max_mb:g} MB limit; send "
                              "fewer or smaller images, or raise the limit (bcd serve "
                              "--max-upload-mb).")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_large  # refused before a byte of the body is read
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise _Refused(415, "send the images as multipart/form-data, in the field 'files'.")
    received = 0
    # The close delimiter, --BOUNDARY--, ends the multipart data: a body cut short before it
    # would lose its last file silently (the parser ends its parts where the bytes end).
    closing = _closing_delimiter(request.headers.get("content-type", ""))
    closed, tail = False, b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    too_slow = _Refused(408, f"the upload took longer than {timeout:g} s; send it again on a "
                             "faster connection, send fewer images, or raise the limit (bcd "
                             "serve --upload-timeout).", {"Connection": "close"})

    async def counting_receive():
        # Content-Length can be absent (chunked) or wrong: count what actually arrives.
        # One deadline for the whole body: a client trickling a byte a second must not keep
        # its upload place for ever.
        nonlocal received, closed, tail
        try:
            message = await asyncio.wait_for(request.receive(), deadline - loop.time())
        except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11 on
            raise too_slow from None
        if message["type"] == "http.disconnect":
            raise _ClientGone(f"after {received:,} bytes")
        if message["type"] == "http.request":
            body = message.get("body", b"")
            received += len(body)
            if received > max_bytes:
                raise too_large
            if closing is not None and not closed:
                # Seen whole in this chunk, or across its start (``tail``: the previous
                # chunks' last bytes, one short of the delimiter).
                closed = closing in body or closing in tail + body[:len(closing) - 1]
                tail = (tail + body)[-(len(closing) - 1):]
        return message

    try:
        form = await Request(request.scope, counting_receive).form(
            max_files=MAX_FILES, max_fields=MAX_FILES)
    except StarletteHTTPException as e:  # Starlette's answer to malformed multipart data
        detail = str(e.detail)
        if detail.startswith("Too many files"):
            raise _Refused(413, f"more than {MAX_FILES} files in one request: send at most "
                                f"{MAX_FILES} files per request, and the rest in further "
                                "requests.") from e
        if detail.startswith("Too many fields"):
            raise _Refused(413, f"more than {MAX_FILES} form fields in one request: send only "
                                f"images, in the field 'files', at most {MAX_FILES} per "
                                "request.") from e
        raise _Refused(400, f"malformed upload: {detail}") from e
    except ClientDisconnect:
        raise _ClientGone(f"after {received:,} bytes") from None
    try:
        if not closed:
            raise _Refused(400, "incomplete upload (no closing boundary): the body ended "
                                "before the end of its multipart data, so files may be "
                                "missing; send it again.")
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


async def _watch_disconnect(request: Request, gone: threading.Event) -> None:
    """Sets ``gone`` when the client disconnects. Run once the body has been read, when the
    next message the server can send is the disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return
        await asyncio.sleep(0.05)  # a server that repeats empty bodies must not spin us


def _gone() -> JSONResponse:
    # Nobody reads this answer; 499 is the status servers log for a client that left.
    return JSONResponse({"detail": "the client disconnected."}, 499)


def create_app(predictor: Predictor | None = None, *, checkpoint: str | Path | None = None,
               device: str = "auto", report: str | Path | EvaluationResult | None = None,
               max_upload_mb: float = _DEFAULTS.max_upload_mb,
               max_concurrency: int = _DEFAULTS.max_concurrency,
               max_queue: int = _DEFAULTS.max_queue,
               max_pixels: int | None = None,
               max_request_megapixels: float = MAX_REQUEST_MEGAPIXELS,
               max_request_tiles: int = MAX_REQUEST_TILES,
               upload_timeout: float = UPLOAD_TIMEOUT, max_uploads: int = MAX_UPLOADS,
               allowed_hosts: Iterable[str] = (), slides: str | Path | None = None,
               backend: str = "torch") -> FastAPI:
    """Builds the web app: the page at ``/``, the API under ``/api``, OpenAPI at ``/docs``.

    Give a loaded ``predictor`` (used as it is), or a ``checkpoint`` to load once when the
    server starts. Inference runs in worker threads, ``max_concurrency`` requests at a time;
    up to ``max_queue`` more wait, and past that requests get 503 with ``Retry-After``.
    A request joins that queue only once its body has arrived: up to ``max_uploads`` may be
    sending at once, each within ``upload_timeout`` seconds (408 beyond), so slow or stalled
    clients never hold a model slot. When a client disconnects, its work stops at the next
    image.

    A request may carry several files. Their headers are checked first against the
    request's pixel and tile budgets (413), then all are decoded and checked before any
    model work, and one bad file refuses the whole request with its status (413, 415 or
    400) and a message naming it; the page sends one request per file, so each gets its own
    answer.

    Only requests whose Host header is an IP address, ``localhost`` or one of
    ``allowed_hosts`` are answered (400 otherwise), against DNS rebinding.

    With ``slides``, the ``--out`` folder of ``bcd slide``, ``/api/slides`` lists its slides
    (reading slides.csv again whenever it changes) and serves their heat maps, tissue masks, top
    tiles, regions and tiles; without it, those answer 404.

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
        max_request_megapixels: Pixels one request may cost, in millions: each image
            decoded plus resized for the model (413 beyond).
        max_request_tiles: Tiles one request's large images may need (413 beyond).
        upload_timeout: Seconds to receive a request's body (408 beyond).
        max_uploads: Requests that may be sending their body at once (503 beyond).
        allowed_hosts: Host names answered to besides IP addresses and localhost; ``"*"``
            answers any.
        slides: The folder ``bcd slide SLIDE... --out DIR`` writes, or None.
        backend: What scores the uploads: ``torch``, ``onnx``, ``float32`` (ONNX Runtime,
            never int8), or ``auto`` (ONNX Runtime on a CPU when installed, int8 where a gated
            int8 model exists: faster; ``bcd serve`` uses ``auto``). Grad-CAM runs on
            PyTorch either way, when the model is a checkpoint.

    Raises:
        UserError: neither or both of ``predictor`` and ``checkpoint``, a bad limit, a
            report of another model, or ``slides`` a file.
    """
    if (predictor is None) == (checkpoint is None):
        raise UserError("create_app needs a predictor or a checkpoint (one of the two).")
    if not max_upload_mb > 0:
        raise UserError(f"max_upload_mb={max_upload_mb} must be positive.")
    if max_concurrency < 1:
        raise UserError(f"max_concurrency={max_concurrency} must be at least 1.")
    if max_queue < 0:
        raise UserError(f"max_queue={max_queue} must be 0 or more.")
    for name, value in (("max_request_megapixels", max_request_megapixels),
                        ("max_request_tiles", max_request_tiles),
                        ("upload_timeout", upload_timeout), ("max_uploads", max_uploads)):
        if not value > 0:
            raise UserError(f"{name}={value} must be positive (bcd serve "
                            f"--{name.replace('_', '-')}).")
    if isinstance(report, (str, Path)):
        report = read_report(report)
    elif isinstance(report, dict):
        report = EvaluationResult.from_json(report)
    service = _Service(max_upload_mb=max_upload_mb, max_pixels=max_pixels, report=report,
                       max_request_megapixels=max_request_megapixels,
                       max_request_tiles=max_request_tiles, upload_timeout=upload_timeout)
    check_backend(backend)  # before a checkpoint is loaded at start-up
    if predictor is not None:
        service.load(predictor, backend)
    gate = _Gate(max_concurrency, max_queue, max_uploads)
    shown = None if slides is None else _Slides(slides)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if service.predictor is None:
            kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
            loaded = await run_in_threadpool(Predictor.from_checkpoint, checkpoint,
                                             device=device, progress=False, **kwargs)
            await run_in_threadpool(service.load, loaded, backend)
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

    app.add_middleware(_Guard, allowed_hosts=list(allowed_hosts))

    _add_routes(app, service, gate, shown)
    _add_slide_routes(app, shown)
    _add_api_fallback(app)
    app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    return app


def _add_api_fallback(app: FastAPI) -> None:
    """Answers an unknown /api path, or a known one asked with the wrong method, in JSON that
    lists the API (the page's mount at / would otherwise answer a bare "Not Found")."""
    from fastapi.routing import APIRoute

    api = [r for r in app.routes if isinstance(r, APIRoute) and r.path.startswith("/api/")]
    listing = ", ".join(f"{sorted(r.methods)[0]} {r.path}" for r in api)

    @app.api_route("/api/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH",
                                                 "DELETE", "OPTIONS"], include_in_schema=False)
    async def api_fallback(request: Request, rest: str) -> JSONResponse:
        allowed = sorted({m for r in api if r.path_regex.match(request.url.path)
                          for m in r.methods})
        if allowed:
            return JSONResponse({"detail": f"{request.method} is not answered at "
                                           f"{request.url.path}: use {' or '.join(allowed)}."},
                                405, headers={"Allow": ", ".join(allowed)})
        return JSONResponse({"detail": f"no API at {request.url.path}; the API is: {listing} "
                                       "(schema at /openapi.json)."}, 404)


def _add_routes(app: FastAPI, service: _Service, gate: _Gate, slides: _Slides | None) -> None:
    """The API: /api/health, /api/model and /api/predict."""
    @app.get("/api/health", response_model=Health, tags=["service"])
    async def health() -> Health:
        """The service is up; which model answers, and how busy it is."""
        p = service.scorer
        return Health(status="ok", model=service.arch, backend=p.backend, device=str(p.device),
                      threshold=p.threshold, version=__version__,
                      max_upload_mb=service.max_upload_mb, max_concurrency=gate.concurrency,
                      max_queue=gate.max_queue, max_uploads=gate.max_uploads,
                      upload_timeout=service.upload_timeout,
                      max_request_megapixels=service.max_request_megapixels,
                      max_request_tiles=service.max_request_tiles, running=gate.running,
                      waiting=gate.waiting, uploading=gate.uploading,
                      slides=slides is not None)

    @app.get("/api/model", tags=["model"])
    async def model() -> dict[str, Any]:
        """The model card: architecture, training data and split, metrics (with confidence
        intervals when an evaluation report was given), threshold, intended use."""
        return service.card

    @app.post("/api/predict", response_model=PredictResponse, tags=["model"],
              openapi_extra=_MULTIPART,
              responses=_errors(
                  _400="Corrupt, truncated or over-large (decompression bomb) image, "
                       "malformed upload, or a Host header this server does not answer to.",
                  _408="The body did not arrive within the upload timeout.",
                  _413="Upload over the size limit, or images over the request's pixel or "
                       "tile budget.",
                  _415="A file that is not an image (or not a format read here), or a body "
                       "that is not multipart.",
                  _422="No files in the field 'files'.",
                  _503="Queue or upload places full; retry after the Retry-After header's "
                       "seconds."))
    async def predict(request: Request) -> dict[str, Any]:
        """Label, P(malignant), threshold and Grad-CAM overlay for each uploaded image.

        Send one or more images as ``multipart/form-data`` in the field ``files``. They are
        all checked before any is predicted; one bad file refuses the request, with a
        message naming it.
        """
        client = "{}:{}".format(*request.client) if request.client else "a client"
        gate.refuse_if_full()
        try:
            async with gate.upload(service.upload_timeout):
                uploads = await _read_uploads(request, service.max_bytes,
                                              service.max_upload_mb, service.upload_timeout)
        except _ClientGone as e:
            log.warning("%s disconnected during its upload (%s); request dropped.", client, e)
            return _gone()
        await run_in_threadpool(service.check_budget, uploads)
        gone = threading.Event()
        watcher = asyncio.create_task(_watch_disconnect(request, gone))
        try:
            async with gate.admit(), gate.slot():
                return await run_in_threadpool(service.run, uploads, gone)
        except _ClientGone:
            log.warning("%s disconnected before its answer; its work was stopped.", client)
            return _gone()
        finally:
            watcher.cancel()


def _add_slide_routes(app: FastAPI, slides: _Slides | None) -> None:
    """/api/slides and /api/slides/{folder}/{name}: the results of ``bcd slide``."""
    not_shown = ("this server shows no whole slides: start it with `bcd serve --slides DIR`, "
                 "DIR being the folder of `bcd slide SLIDE... --out DIR`.")

    @app.get("/api/slides", tags=["slides"],
             responses=_errors(_404="The server was started without --slides."))
    def list_slides() -> Any:
        """The slides of ``bcd slide --out DIR``, one per row of its slides.csv, read again
        whenever it changes.

        Each has its file name (never its path), score, tiles, tumour tiles, tissue mm²,
        error (empty, or why it failed), folder, number of regions and the largest ones, and
        ``files``: the URLs of its files, relative to this listing's
        (``slides/FOLDER/heatmap.png`` is ``/api/slides/FOLDER/heatmap.png``). ``message``
        says why the list is empty when slides.csv is missing or unreadable.
        """
        if slides is None:
            return JSONResponse({"detail": not_shown}, 404)
        return slides.listing()

    @app.get("/api/slides/{folder}/{name}", tags=["slides"],
             response_class=FileResponse,
             responses={200: {"content": {t: {} for t in SLIDE_FILES.values()},
                              "description": "The file."},
                        **_errors(_404="Not a file served here, or no --slides.")})
    def slide_file(folder: str, name: str) -> Any:
        """One file of a slide listed in slides.csv: heatmap.png, tissue.png, top_tiles.png,
        regions.geojson (QuPath: File > Import objects) or tiles.csv."""
        path = None if slides is None else slides.file(folder, name)
        if path is None:
            detail = not_shown if slides is None else (
                f"no such slide file; a slide listed by /api/slides has "
                f"{', '.join(SLIDE_FILES)}.")
            return JSONResponse({"detail": detail}, 404)
        # The data files are downloads, named after their slide; the pictures are shown.
        download = None if name.endswith(".png") else f"{folder}-{name}"
        return FileResponse(path, media_type=SLIDE_FILES[name], filename=download)

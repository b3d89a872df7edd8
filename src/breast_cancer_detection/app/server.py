"""The web app's wiring: :func:`create_app` builds the FastAPI app from the parts of this
package (the service, the admission gate, the security middleware, the routers, the page)
around one loaded Predictor."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..config import check_backend
from ..errors import UserError
from ..inference import Predictor
from ..results import EvaluationResult
from .card import model_card, read_report
from .connections import uvicorn_options
from .fallback import fallback_router
from .gate import Gate
from .limits import CONNECTION_HEADROOM, MAX_FILES, ServeLimits
from .refusals import Refused, refused
from .routes_predict import router as predict_router
from .routes_slides import router as slides_router
from .security import Guard
from .service import PREVIEW_SIDE, Service
from .slides import REGIONS_MAX_BYTES, Slides

__all__ = ["CONNECTION_HEADROOM", "MAX_FILES", "PREVIEW_SIDE", "REGIONS_MAX_BYTES", "STATIC",
           "create_app", "model_card", "read_report", "uvicorn_options"]

STATIC = Path(__file__).with_name("static")
"""The page: plain HTML, JavaScript and CSS, served as they are."""

_Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]
"""What FastAPI runs around serving: here, the loading of a checkpoint at start-up."""


def create_app(predictor: Predictor | None = None, *, checkpoint: str | Path | None = None,
               device: str = "auto", report: str | Path | EvaluationResult | None = None,
               max_upload_mb: float = ServeLimits.max_upload_mb,
               max_concurrency: int = ServeLimits.max_concurrency,
               max_queue: int = ServeLimits.max_queue, max_pixels: int | None = None,
               max_request_megapixels: float = ServeLimits.max_request_megapixels,
               max_request_tiles: int = ServeLimits.max_request_tiles,
               upload_timeout: float = ServeLimits.upload_timeout,
               max_uploads: int = ServeLimits.max_uploads,
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
            never int8), or ``auto`` (:data:`bcd.config.BACKEND_HELP`; ``bcd serve`` uses
            it). Grad-CAM runs on PyTorch either way, when the model is a checkpoint.

    Raises:
        UserError: neither or both of ``predictor`` and ``checkpoint``, a bad limit, a
            report of another model, or ``slides`` a file.
    """
    if (predictor is None) == (checkpoint is None):
        raise UserError("create_app needs a predictor or a checkpoint (one of the two).")
    limits = _checked(ServeLimits(
        max_upload_mb=max_upload_mb, max_concurrency=max_concurrency, max_queue=max_queue,
        max_request_megapixels=max_request_megapixels, max_request_tiles=max_request_tiles,
        upload_timeout=upload_timeout, max_uploads=max_uploads))
    service = Service(limits, max_pixels=max_pixels, report=_report(report))
    check_backend(backend)  # before a checkpoint is loaded at start-up
    if predictor is not None:
        service.load(predictor, backend)
    app = _app(_loading(checkpoint, device=device, max_pixels=max_pixels, backend=backend),
               allowed_hosts)
    app.state.limits, app.state.service, app.state.gate = limits, service, Gate(limits)
    app.state.slides = None if slides is None else Slides(slides)
    return app


def _app(lifespan: _Lifespan, allowed_hosts: Iterable[str]) -> FastAPI:
    """The FastAPI app: its middleware, the API's routers and fallback, and the page at ``/``;
    ``app.state`` is the caller's to fill (:mod:`.dependencies` reads it)."""
    app = FastAPI(
        title="Breast cancer detection",
        version=__version__,
        summary="Benign vs malignant H&E histopathology images, with Grad-CAM. A research "
                "tool, not a medical device.",
        lifespan=lifespan,
    )
    app.add_exception_handler(Refused, refused)
    app.add_middleware(Guard, allowed_hosts=list(allowed_hosts))
    for router in (predict_router, slides_router, fallback_router(predict_router, slides_router)):
        app.include_router(router)
    app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    return app


def _report(report: str | Path | dict | EvaluationResult | None) -> EvaluationResult | None:
    """``report`` as an EvaluationResult: read from the path of a ``bcd evaluate``
    metrics.json, made from its dict, or as given (None too)."""
    if isinstance(report, (str, Path)):
        return read_report(report)
    if isinstance(report, dict):
        return EvaluationResult.from_json(report)
    return report


def _checked(limits: ServeLimits) -> ServeLimits:
    """``limits``, when each is in its range.

    Raises:
        UserError: a limit out of its range, naming its ``bcd serve`` option.
    """
    if not limits.max_upload_mb > 0:
        raise UserError(f"max_upload_mb={limits.max_upload_mb} must be positive.")
    if limits.max_concurrency < 1:
        raise UserError(f"max_concurrency={limits.max_concurrency} must be at least 1.")
    if limits.max_queue < 0:
        raise UserError(f"max_queue={limits.max_queue} must be 0 or more.")
    for name in ("max_request_megapixels", "max_request_tiles", "upload_timeout", "max_uploads"):
        value = getattr(limits, name)
        if not value > 0:
            raise UserError(f"{name}={value} must be positive (bcd serve "
                            f"--{name.replace('_', '-')}).")
    return limits


def _loading(checkpoint: str | Path | None, *, device: str, max_pixels: int | None,
             backend: str) -> _Lifespan:
    """The app's lifespan: loads ``checkpoint`` when the server starts, unless a predictor was
    given."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service: Service = app.state.service
        if service.predictor is None:
            kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
            loaded = await run_in_threadpool(Predictor.from_checkpoint, checkpoint,
                                             device=device, progress=False, **kwargs)
            await run_in_threadpool(service.load, loaded, backend)
        yield

    return lifespan

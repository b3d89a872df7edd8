"""The model's routes: /api/health, /api/model and /api/predict."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from .. import __version__
from .dependencies import gate_of, service_of, slides_of
from .gate import Gate
from .refusals import ClientGone, gone
from .schemas import MULTIPART_BODY, Health, PredictResponse, error_responses
from .service import Service
from .slides import Slides
from .uploads import read_uploads, watch_disconnect

log = logging.getLogger(__name__)

router = APIRouter()
"""The routes of this module, for ``app.include_router``."""

ServiceDep = Annotated[Service, Depends(service_of)]
GateDep = Annotated[Gate, Depends(gate_of)]


@router.get("/api/health", response_model=Health, tags=["service"])
async def health(service: ServiceDep, gate: GateDep,
                 slides: Annotated[Slides | None, Depends(slides_of)]) -> Health:
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


@router.get("/api/model", tags=["model"])
async def model(service: ServiceDep) -> dict[str, Any]:
    """The model card: architecture, training data and split, metrics (with confidence
    intervals when an evaluation report was given), threshold, intended use."""
    return service.card


@router.post("/api/predict", response_model=PredictResponse, tags=["model"],
             openapi_extra=MULTIPART_BODY,
             responses=error_responses(
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
async def predict(request: Request, service: ServiceDep, gate: GateDep) -> dict[str, Any]:
    """Label, P(malignant), threshold and Grad-CAM overlay for each uploaded image.

    Send one or more images as ``multipart/form-data`` in the field ``files``. They are
    all checked before any is predicted; one bad file refuses the request, with a
    message naming it.
    """
    client = "{}:{}".format(*request.client) if request.client else "a client"
    gate.refuse_if_full()
    try:
        async with gate.upload(service.upload_timeout):
            uploads = await read_uploads(request, service.max_bytes,
                                         service.max_upload_mb, service.upload_timeout)
    except ClientGone as e:
        log.warning("%s disconnected during its upload (%s); request dropped.", client, e)
        return gone()
    await run_in_threadpool(service.check_budget, uploads)
    gone_event = threading.Event()
    watcher = asyncio.create_task(watch_disconnect(request, gone_event))
    try:
        async with gate.admit(), gate.slot():
            return await run_in_threadpool(service.run, uploads, gone_event)
    except ClientGone:
        log.warning("%s disconnected before its answer; its work was stopped.", client)
        return gone()
    finally:
        watcher.cancel()

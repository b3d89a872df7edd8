"""The service: the loaded model, and the work of one request in a worker thread: the cost of
its images from their headers, decoding, prediction and Grad-CAM."""

from __future__ import annotations

import base64
import io
import threading
import time
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..data.datasets import ALLOWED_FORMATS, ImageError, ImageFormatError, open_rgb
from ..explain import explain, overlay
from ..inference import NON_FINITE, Predictor, image_cost
from ..plots import HEATMAP_CMAP
from ..results import EvaluationResult
from .card import model_card, without_local_paths
from .limits import TILE_UNIT, ServeLimits
from .refusals import ClientGone, Refused
from .uploads import Upload

PREVIEW_SIDE = 1024
"""Long side, in pixels, of the tile heat map picture sent back for a large image."""


def _png_data_url(image: Image.Image) -> str:
    """``image`` as a data:image/png;base64 URL."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Service:
    """The loaded model and the work of one request, run in a worker thread."""

    def __init__(self, limits: ServeLimits, *, max_pixels: int | None,
                 report: EvaluationResult | None):
        self.limits = limits
        self.max_upload_mb = limits.max_upload_mb
        self.max_bytes = int(limits.max_upload_mb * 1024 * 1024)
        self.max_pixels = max_pixels
        self.max_request_megapixels = limits.max_request_megapixels
        self.max_request_tiles = limits.max_request_tiles
        self.upload_timeout = limits.upload_timeout
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
        self.card = without_local_paths(model_card(predictor, self.report, scorer=scorer))
        self.predictor, self.scorer = predictor, scorer

    @property
    def arch(self) -> str:
        return self.predictor.arch if self.predictor else ""

    def _limit(self) -> int | None:
        return self.max_pixels if self.max_pixels is not None else self.predictor.max_pixels

    def _cost(self, width: int, height: int) -> tuple[int, int]:
        """Pixels held and model passes needed for one image, as ``predict`` and ``explain``
        will treat it (:func:`~breast_cancer_detection.inference.image_cost`)."""
        return image_cost(self.predictor.pre, width, height)

    def check_budget(self, uploads: list[Upload]) -> tuple[int, int]:
        """Refuses a request whose images would cost too much, reading only their headers.

        Files that Pillow cannot open are let through: :meth:`decode` says why they fail.

        Returns:
            The request's pixels (decoded and resized views) and tiles.

        Raises:
            Refused: 415 for a format not decoded here, 400 for an image over the per-image
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
                raise Refused(400, f"{upload.name}: {w}x{h} pixels is over the limit of "
                                   f"{limit:,} (a possible decompression bomb); raise the limit "
                                   "(bcd serve --max-pixels) if it is genuine.")
            p, t = self._cost(w, h)
            costs.append((p, t, upload.name, w, h))
            pixels, tiles = pixels + p, tiles + t
        if pixels > self.max_request_megapixels * 1e6:
            p, _, name, w, h = max(costs)
            raise Refused(413, f"this request's {len(costs)} image(s) come to "
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
            raise Refused(413, f"this request's images need {tiles} tiles (model passes over "
                               f"{side} px squares at the image's own scale{as_units}; the "
                               f"largest, {name}, {w}x{h}, needs {t}), over the limit of "
                               f"{self.max_request_tiles} per request (a tile of {TILE_UNIT} "
                               "px or more counts one, a smaller one by its area); send fewer "
                               "or smaller images, or raise the limit (bcd serve "
                               "--max-request-tiles).")
        return pixels, tiles

    def decode(self, upload: Upload) -> Image.Image:
        """The upload as RGB, or the error status that says why not."""
        if not upload.data:
            raise Refused(415, f"{upload.name}: the file is empty; upload an image.")
        buf = io.BytesIO(upload.data)
        buf.name = upload.name  # open_rgb's messages name the file
        try:
            return open_rgb(buf, max_pixels=self._limit())
        except ImageFormatError as e:
            raise Refused(415, str(e)) from e  # names the formats accepted
        except ImageError as e:
            cause = e.__cause__
            if isinstance(cause, UnidentifiedImageError):
                raise Refused(400, str(e)) from e  # starts like an image format: damaged
            if isinstance(cause, OSError) and not isinstance(cause, Image.DecompressionBombError):
                raise Refused(400, f"{upload.name}: corrupt or truncated image, cannot be "
                                   f"decoded ({cause}). Upload the original image.") from e
            raise Refused(400, str(e)) from e  # too many pixels: the message says the limit

    def run(self, uploads: list[Upload], gone: threading.Event | None = None
            ) -> dict[str, Any]:
        """Predicts and explains every upload; any bad one refuses the whole request.

        ``gone`` is set when the client disconnects: the work stops at the next image.
        """
        gone = gone or threading.Event()

        def check() -> None:
            if gone.is_set():
                raise ClientGone

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
                    raise Refused(status, f"{upload.name}: {p.error}")
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

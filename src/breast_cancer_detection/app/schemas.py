"""The API's schemas: the pydantic models of its answers, and the OpenAPI text of the upload
body and of the error answers."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from .limits import MAX_FILES


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


MULTIPART_BODY = {
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
"""OpenAPI ``openapi_extra`` of /api/predict: its multipart body, which the route reads
itself."""


def error_responses(**codes: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses, given as ``_404="why"``: each an
    :class:`ErrorBody`."""
    return {int(code[1:]): {"model": ErrorBody, "description": text}
            for code, text in codes.items()}

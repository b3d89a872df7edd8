"""Predictions from a checkpoint: ``Predictor.from_checkpoint(path).predict(images)``.

The package's rooms, each importing only those above it in this list:

- :mod:`.results`: what a prediction gives back (:class:`Prediction`,
  :func:`predictions_frame`, :func:`summarize_patients`) and which image files it is given
  (:func:`collect_images`).
- :mod:`.prepare`: images made ready for the model: the tiling rule and what an image costs
  (:func:`image_cost`, :func:`tile_starts`), reading and refusing one input
  (:class:`Preparer`), and the inputs of one call one by one.
- :mod:`.backends`: where a model runs (PyTorch, ONNX Runtime, the int8 ONNX model) and the
  one rule that picks among them (:func:`select_backend`, :data:`BACKEND_HELP`).
- :mod:`.predictor`: :class:`Predictor`, which loads a model and runs it on images or on an
  index table.
"""

from ..config import BACKEND_HELP
from .backends import select_backend
from .predictor import Predictor
from .prepare import (
    DEFAULT_TILE_FACTOR,
    PATCH_MODEL,
    Prepared,
    Preparer,
    image_cost,
    tile_starts,
)
from .results import (
    NON_FINITE,
    Prediction,
    collect_images,
    predictions_frame,
    summarize_patients,
)

__all__ = [
    "BACKEND_HELP",
    "DEFAULT_TILE_FACTOR",
    "NON_FINITE",
    "PATCH_MODEL",
    "Prediction",
    "Predictor",
    "Prepared",
    "Preparer",
    "collect_images",
    "image_cost",
    "predictions_frame",
    "select_backend",
    "summarize_patients",
    "tile_starts",
]

"""The run-time half of int8: whether an int8 model may serve, and where it comes from.

An int8 ONNX model (made by ``bcd export --int8``, see :mod:`.quantize`) serves only while its
gate record holds under today's rule (:func:`gate_holds`) and it was made from the
checkpoint's own weights (:func:`int8_of`). :func:`cached_int8` opens one from the cache;
:func:`unpack_int8` copies the one a checkpoint carries (``--embed``) into the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import Checkpoint
from .errors import UserError
from .export import import_optional, read_onnx_metadata, weights_digest

AUC_TOLERANCE = 0.003
"""Largest ROC AUC the int8 model may lose against float32 on labelled gate images."""

PROB_TOLERANCE = 0.05
"""Largest |P(malignant) difference| allowed on gate images without labels of both classes."""

SAME_LABEL = 0.99
"""Share of gate images that must get the same label at the model's threshold (AUC alone
measures ranking: a shift of every probability would pass it and move every decision)."""


def int8_of(ckpt: Checkpoint, data: bytes) -> str | None:
    """Why ``data`` cannot serve as the int8 model of ``ckpt`` (not one of our int8 exports,
    no gate figures that hold today, or made from other weights), or None when it can."""
    ort = import_optional("onnxruntime")
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        record = read_onnx_metadata(session).get("int8")
    except Exception as e:  # noqa: BLE001 - onnxruntime raises many kinds
        return f"not an int8 model of ours ({type(e).__name__}: {e})"
    if not gate_holds(record):
        return "its accuracy gate figures are missing or do not pass today's gate"
    if record.get("weights") != weights_digest(ckpt):
        return ("it was made from other weights (the checkpoint was retrained or fine-tuned "
                "since); embed a new one with `bcd export --int8 --embed`")
    return None


def cached_int8(path: Path):
    """The int8 model at ``path`` in the cache as an OnnxModel, and None; or None and why
    it cannot serve (None too when there is no file)."""
    from .export import OnnxModel

    if not path.is_file():
        return None, None
    try:
        model = OnnxModel(path)
    except UserError as e:  # a damaged copy
        return None, f"is unusable ({e})"
    if not gate_holds(model.metadata.get("int8")):
        return None, ("was not checked by the current accuracy gate (export it again with "
                      "--int8)")
    return model, None


def unpack_int8(ckpt: Checkpoint, dest: Path) -> bool:
    """Writes the int8 model a checkpoint carries (``bcd export --int8 --embed``) to
    ``dest`` in the cache, where :meth:`Predictor.on_backend` (and its lanes, which open the
    file) find it, and says whether it did; one that is not these weights' or fails today's
    gate is left out, as when the cache cannot be written, with a warning."""
    import warnings

    from . import files

    why = int8_of(ckpt, ckpt.int8_onnx)
    if why is not None:
        warnings.warn(f"the int8 model in the checkpoint is not used: {why}; float32 runs.",
                      stacklevel=3)
        return False
    data = ckpt.int8_onnx
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write(dest, lambda f: f.write(data))
    except OSError as e:
        warnings.warn(f"the int8 model in the checkpoint is not used: it could not be written "
                      f"to the cache ({dest}: {e.strerror or e}); float32 runs. Point $BCD_CACHE "
                      "at a writable folder to use it.", stacklevel=3)
        return False
    return True


def gate_holds(record: dict[str, Any] | None) -> bool:
    """Whether an int8 model's gate record (its ``int8`` metadata) passes today's gate.

    The record must carry the figures its rule reads (``max_abs_diff`` for the probability
    rule; ``auc_float32``, ``auc_int8`` and ``same_label`` for the AUC rule): ``passed``
    alone, or a figure missing or not a finite number, does not hold.
    """
    if not record or not record.get("passed"):
        return False

    def figure(key: str) -> float | None:
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value) if np.isfinite(value) else None

    if record.get("auc_float32") is None:  # the probability rule
        diff = figure("max_abs_diff")
        return diff is not None and diff <= PROB_TOLERANCE
    auc_a, auc_b, same = figure("auc_float32"), figure("auc_int8"), figure("same_label")
    if auc_a is None or auc_b is None or same is None:
        return False
    return auc_a - auc_b <= AUC_TOLERANCE and same >= SAME_LABEL

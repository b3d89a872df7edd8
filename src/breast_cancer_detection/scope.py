"""What a model is for, at what scale it reads, and when an input lies outside it.

One place for the rules every door applies: the model card's intended use and not-for
(:func:`model_scope`), the scale the model was trained at (:func:`model_scale`, also what
``bcd slide`` cuts tiles at), and the warning an answer carries when its image lies outside
what the model was made for (:func:`scope_warning`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .data.breakhis import parse_breakhis_name

if TYPE_CHECKING:
    from .inference import Predictor

BREAKHIS_MODEL = "breakhis-patch-cnn"
"""The registry name of the bundled BreakHis model, which messages point to."""

# Approximate micrometres per pixel of BreakHis images (Olympus BX-50, 3.3x relay lens,
# Samsung SCC-131AN camera with 6.5 um pixels: 6.5 / (objective x 3.3)); BreakHis names
# magnifications by objective x 10 eyepiece.
BREAKHIS_MPP = {"40X": 0.49, "100X": 0.197, "200X": 0.098, "400X": 0.049}

SCALE_TOLERANCE = 1.25
"""An image's scale may differ from the model's by this factor, either way, before its answer
carries a warning (:func:`scope_warning`)."""


def stated_scale(predictor: Predictor) -> tuple[float, str] | None:
    """The micrometres per pixel the model states it was trained at, and where it says so:
    the checkpoint's ``mpp``, an ONNX export's metadata, or the trained-model registry's entry;
    None for a model that states none (BreakHis checkpoints state magnifications instead)."""
    ckpt = predictor.checkpoint
    if ckpt is not None and ckpt.mpp:
        return float(ckpt.mpp), "checkpoint"
    if predictor.backend == "onnx" and predictor.model.metadata.get("mpp"):
        return float(predictor.model.metadata["mpp"]), "ONNX metadata"
    entry = predictor.trained_model
    if entry is not None and entry.mpp:
        return float(entry.mpp), f"trained model {entry.name}"
    return None


def model_scale(predictor: Predictor) -> tuple[float, str] | None:
    """:func:`stated_scale`, else for a BreakHis checkpoint trained at one magnification
    that magnification's approximate scale (:data:`BREAKHIS_MPP`); None when neither."""
    stated = stated_scale(predictor)
    if stated is not None:
        return stated
    ckpt = predictor.checkpoint
    if ckpt is not None and ckpt.magnification and len(ckpt.magnification) == 1:
        mag = ckpt.magnification[0]
        if mag in BREAKHIS_MPP:
            return BREAKHIS_MPP[mag], f"BreakHis {mag} (approximate)"
    return None


def model_scope(predictor: Predictor) -> dict[str, str]:
    """What the model is for and not for, in words: a named model's own (its registry
    entry, the source of its model card); for a checkpoint of one's own, what its training
    data allows one to say."""
    entry = predictor.trained_model
    if entry is not None and entry.intended_use:
        return {"intended_use": entry.intended_use, "not_for": entry.not_for}
    ckpt = predictor.checkpoint
    data = Path(str(ckpt.config.get("data") or "")).name if ckpt is not None else ""
    trained = f" on {data}" if data else ""
    stated = stated_scale(predictor)
    scale = (f" at {stated[0]:g} um/px" if stated else
             f" at {', '.join(ckpt.magnification)}" if ckpt is not None
             and ckpt.magnification else "")
    return {
        "intended_use": (
            f"Research and teaching: tells {' from '.join(predictor.classes)} tissue in H&E "
            f"images like those it was trained{trained}{scale}. A model trained with "
            "`bcd train`; its card holds the figures it was chosen and tested on."),
        "not_for": (
            "Diagnosis, treatment or triage of patients (not a medical device); images "
            "unlike its training data (other organs, stains, scanners or scales) without "
            "validating it there first."),
    }


def scope_warning(predictor: Predictor, source: str, size: tuple[int, int] | None,
                  tiles: int,
                  mpp: float | None = None, *, tile_size: int | None = None
                  ) -> str | None:
    """Why one image lies outside what the model was made for, from what can be measured
    or read; None when nothing does.

    - Its file name is a BreakHis name and the model was trained at a stated scale on
      other tissue (the bundled PCam model), or on other BreakHis magnifications.
    - Its scale was given (``mpp``) and differs from the model's by more than
      :data:`SCALE_TOLERANCE` times.
    - It was cut into several tiles with no scale given: the tiles are read as if their
      pixels were the training images' pixels, which nothing checked.
    - It is smaller than the images the model reads (enlarged more than
      :data:`SCALE_TOLERANCE` times to its input).

    Args:
        source: The file name (or ``<image N>``).
        size: ``(width, height)`` of the image.
        tiles: How many tiles it was cut into (1: predicted whole).
        mpp: Its micrometres per pixel, when known.
        tile_size: The tile side it was cut at (default: the model's).
    """
    stated = stated_scale(predictor)
    model_mpp = stated[0] if stated else None
    name = parse_breakhis_name(Path(str(source)).name)
    ckpt = predictor.checkpoint
    if name is not None and model_mpp is not None:
        return (f"a BreakHis breast biopsy by its name ({name.magnification}); "
                f"{predictor.model_name} was trained at {model_mpp:g} um/px on other tissue, "
                f"not on BreakHis: score it with --model {BREAKHIS_MODEL}.")
    if name is not None and ckpt is not None and ckpt.magnification and (
            name.magnification not in ckpt.magnification):
        return (f"a {name.magnification} BreakHis image by its name; the model was trained "
                f"on {', '.join(ckpt.magnification)} only.")
    if mpp is not None and model_mpp is not None and not (
            1 / SCALE_TOLERANCE <= mpp / model_mpp <= SCALE_TOLERANCE):
        return (f"its scale, {mpp:g} um/px (--mpp), is {mpp / model_mpp:.2g} times the "
                f"{model_mpp:g} um/px the model was trained at; rescale it to "
                f"{model_mpp:g} um/px first.")
    if tiles > 1 and mpp is None:
        tile = int(tile_size or predictor.pre.resize or predictor.pre.size)
        assumed = (f"at an assumed {model_mpp:g} um/px, the model's training scale"
                   if model_mpp is not None else
                   "at its own pixel size, assumed to be that of the training images")
        give = " (give --mpp to state its scale)" if model_mpp is not None else ""
        return (f"cut into {tiles} tiles of {tile} px, read {assumed}{give}; nothing "
                "checked it, and at another scale the answer means nothing.")
    if size is not None and tiles == 1:
        side = predictor.pre.resize or predictor.pre.size
        enlarged = side / min(size)
        if enlarged > SCALE_TOLERANCE:
            return (f"{size[0]}x{size[1]} pixels, smaller than the images the model reads: "
                    f"enlarged {enlarged:.2g} times to its {side} px input, so its tissue "
                    "looks larger than in training.")
    return None


def wrong_data_note(predictor: Predictor, files: list[str | Path]) -> str | None:
    """One line for a whole run when images named as BreakHis names them are given to a
    model trained at a stated scale on other data (the bundled PCam model: 96 px
    lymph-node patches at 0.97 um/px), with what was measured there; None otherwise.
    Each such image's own ``warning`` says so too (:meth:`scope_warning`)."""
    stated = stated_scale(predictor)
    if stated is None:
        return None
    model_mpp = stated[0]
    found = [n for n in (parse_breakhis_name(Path(str(f)).name) for f in files)
             if n is not None]
    if not found:
        return None
    mags = ", ".join(sorted({n.magnification for n in found}, key=lambda m: int(m[:-1])))
    are = "is a BreakHis breast biopsy" if len(found) == 1 else (
        "are BreakHis breast biopsies")
    return (f"{len(found)} of these {len(files)} images {are} by "
            f"their names ({mags}); {predictor.model_name} was trained at {model_mpp:g} "
            "um/px on other tissue, not on BreakHis, and ranks BreakHis images only "
            "weakly (the bundled PCam model: image ROC AUC 0.72, accuracy 0.52 on 141 real "
            "BreakHis images of 18 patients; docs/results.md). Score them with the "
            f"BreakHis model: drop --model and the checkpoint, or pass --model "
            f"{BREAKHIS_MODEL}.")

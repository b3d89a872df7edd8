"""Predictions from a checkpoint: ``Predictor.from_checkpoint(path).predict(images)``."""

from __future__ import annotations

import math
import os
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import scope as _scope
from .checkpoint import Checkpoint, amp_dtype, load_checkpoint, resolve_device
from .config import check_backend
from .data.breakhis import CLASSES, IMAGE_SUFFIXES, parse_breakhis_name
from .data.datasets import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageTableDataset,
    collate_skip_bad,
    open_rgb,
    run_lanes,
)
from .data.transforms import MAX_ASPECT, Preprocessing, build_eval_transform, view_mean
from .errors import UserError
from .hub import cache_root, local_file

NON_FINITE = "the model produced non-finite output"
"""How a prediction error caused by the model itself (not the image) begins."""

PATCH_MODEL = "pcam-patch-cnn"
"""The registry name of the bundled 96 px patch model, which messages point to."""

DEFAULT_TILE_FACTOR = 2.0
"""Images whose short side exceeds this many tile sides are tiled instead of shrunk."""




# ----------------------------------------------------------------------------- results


@dataclass
class Prediction:
    """One image's answer.

    Attributes:
        source: The file path, or ``<image N>`` for an image given in memory.
        probabilities: Class name -> probability; NaN when the image could not be read.
        label: The class at the stored threshold on P(malignant), or ``"error"``.
        threshold: P(malignant) at or above which the label is malignant.
        error: Why the image could not be read, or None.
        tiles: How many tiles were averaged: 1 for an image predicted whole, 0 after an error.
        heatmap: For a tiled image, P(malignant) of each tile as a ``(rows, cols)`` array in
            image order (row 0 at the top); None otherwise.
        warning: Why this image lies outside what the model was made for (see
            :meth:`Predictor.scope_warning`), or None.
        size: ``(width, height)`` of the image in pixels; None when it could not be read.
    """

    source: str
    probabilities: dict[str, float]
    label: str
    threshold: float
    error: str | None = None
    tiles: int = 1
    heatmap: np.ndarray | None = None
    warning: str | None = None
    size: tuple[int, int] | None = None

    @property
    def p_malignant(self) -> float:
        """The probability of the malignant class (NaN after an error)."""
        return self.probabilities.get(CLASSES[1], float("nan"))

    def to_row(self) -> dict[str, Any]:
        """The prediction as one CSV row: file, label, p_<class>..., threshold, tiles,
        warning, error."""
        row: dict[str, Any] = {"file": self.source, "label": self.label}
        row.update({f"p_{c}": p for c, p in self.probabilities.items()})
        row.update(threshold=self.threshold, tiles=self.tiles, warning=self.warning or "",
                   error=self.error or "")
        return row


def predictions_frame(predictions: list[Prediction], **columns: Any) -> pd.DataFrame:
    """The predictions as a table, one row per image (see :meth:`Prediction.to_row`);
    ``columns`` (e.g. ``model=``, ``backend=``) are added as constant columns."""
    table = pd.DataFrame([p.to_row() for p in predictions])
    for name, value in columns.items():
        table[name] = value
    return table


def summarize_patients(predictions: pd.DataFrame | list[Prediction],
                       threshold: float | None = None) -> pd.DataFrame:
    """Patient-level answers for images whose file names are BreakHis names.

    A patient's P(malignant) is the mean over their readable images; the label applies the
    same threshold as the images. Files whose names do not parse, and failed images, are left
    out.

    Args:
        predictions: :func:`predictions_frame` output (or the CSV ``bcd predict`` writes), or
            the Prediction list itself.
        threshold: Decision threshold; None takes the table's ``threshold`` column.

    Returns:
        One row per patient: ``patient``, ``images``, ``p_malignant``, ``label``,
        ``threshold`` and ``name_label`` (the class the BreakHis file names state). Empty
        when no file name parses.
    """
    df = predictions if isinstance(predictions, pd.DataFrame) else predictions_frame(predictions)
    columns = ["patient", "images", "p_malignant", "label", "threshold", "name_label"]
    errors = df["error"].fillna("").astype(str) if "error" in df else pd.Series("", df.index)
    names = [parse_breakhis_name(Path(str(f)).name) for f in df["file"]]
    keep = [n is not None and e == "" and np.isfinite(p)
            for n, e, p in zip(names, errors, df["p_malignant"])]
    if not any(keep):
        return pd.DataFrame(columns=columns)
    sub = df[keep].assign(patient=[n.patient for n, k in zip(names, keep) if k],
                          name_label=[n.label for n, k in zip(names, keep) if k])
    if threshold is None:
        threshold = float(sub["threshold"].iloc[0])
    out = sub.groupby("patient", sort=True).agg(
        images=("p_malignant", "size"), p_malignant=("p_malignant", "mean"),
        name_label=("name_label", lambda s: "/".join(sorted(set(s))))).reset_index()
    out["label"] = np.where(out["p_malignant"] >= threshold, CLASSES[1], CLASSES[0])
    out["threshold"] = threshold
    return out[columns]


# ----------------------------------------------------------------------------- inputs


def collect_images(paths) -> list[Path]:
    """The image files named by ``paths``: files as given, folders searched recursively.

    A folder contributes its image files (by suffix, hidden files skipped) in sorted order.
    A file is kept whatever its suffix, so a wrong or unreadable file named explicitly ends
    up as an error row instead of being passed over silently.
    """
    out: list[Path] = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                          and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


def tile_starts(length: int, tile: int) -> list[int]:
    """Offsets of tiles of side ``tile`` with half-tile overlap; the last one ends flush."""
    stride = max(1, tile // 2)
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


@dataclass
class Prepared:
    """One input made ready for the model, or the reason it could not be."""

    index: int
    x: torch.Tensor | None = None          # (1, 3, size, size), an image predicted whole
    image: torch.Tensor | None = None      # (3, H, W) uint8, an image to be tiled
    boxes: list[tuple[int, int]] | None = None  # top-left corners of the tiles
    grid: tuple[int, int] | None = None
    error: str | None = None
    size: tuple[int, int] | None = None     # (width, height) of the image as read


class Preparer:
    """Reads one input and applies the evaluation transform, tiling large images.

    Inputs that would give no honest answer, or cost far more than their size suggests, are
    refused with a message: a short side under half the model's input (too little tissue at
    the training scale; upsampling it would invent the rest), and, for an image predicted
    whole, a long side over :data:`MAX_ASPECT` times the short one (the model would see only
    the centre, and the resize allocates in proportion to the ratio). Running out of memory
    on one input is that input's error too.

    A plain object rather than a method of Predictor, so that DataLoader workers can pickle
    it without the model.
    """

    def __init__(self, pre: Preprocessing, transform, *, max_pixels: int | None,
                 tile_factor: float | None, tile_size: int | None):
        self.pre = pre
        self.transform = transform
        self.max_pixels = max_pixels
        if tile_factor is not None and tile_factor < 1:
            raise UserError(f"tile_factor={tile_factor} must be at least 1 (an image is tiled "
                            "when its short side exceeds that many tiles), or None to never "
                            "tile.")
        if tile_size is not None and tile_size < 1:
            raise UserError(f"tile_size={tile_size} must be a positive number of pixels.")
        self.tile_factor = tile_factor
        self.tile = int(tile_size or pre.resize or pre.size)
        self.min_side = math.ceil(pre.size / 2)

    def tiled(self, width: int, height: int) -> bool:
        """Whether an image of this size is cut into tiles rather than predicted whole."""
        return self.tile_factor is not None and min(width, height) > self.tile_factor * self.tile

    def __call__(self, index: int, item) -> Prepared:
        # Files are named in the message (as open_rgb does); in-memory images by the caller.
        name = item if _is_path(item) else getattr(item, "name", None)
        prefix = f"{name}: " if name else ""
        size = "the image"
        full: list[tuple[int, int]] = []

        def reduced(w: int, h: int) -> int | None:
            # A JPEG predicted whole is resized down to the model's input: decoding it at a
            # reduced scale (never below that input) skips most of the work. Tiles are cut at
            # the image's own scale, so a tiled one is decoded whole.
            full.append((w, h))
            return None if self.tiled(w, h) else (self.pre.resize or self.pre.size)

        try:
            image = open_rgb(item, max_pixels=self.max_pixels, reduced=reduced)
            w, h = full[0] if full else image.size  # the checks below judge the file's size
            size = f"{w}x{h} pixels"
            refusal = self._refusal(w, h)
            if refusal is not None:
                return Prepared(index, error=prefix + refusal)
            if not self.tiled(w, h):
                return Prepared(index, x=self.transform(image).unsqueeze(0), size=(w, h))
            ys, xs = tile_starts(h, self.tile), tile_starts(w, self.tile)
            tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        except (ImageError, OSError) as e:
            return Prepared(index, error=str(e))
        except MemoryError:
            return Prepared(index, error=f"{prefix}ran out of memory preparing {size}; "
                             "lower --max-pixels (max_pixels) to refuse such images, or free "
                             "memory and run again.")
        return Prepared(index, image=tensor, boxes=[(y, x) for y in ys for x in xs],
                         grid=(len(ys), len(xs)), size=(w, h))

    def _refusal(self, w: int, h: int) -> str | None:
        """Why an image of this size gets no prediction, or None."""
        short, long = min(w, h), max(w, h)
        if short < self.min_side:
            return (f"{w}x{h} pixels is too small to hold tissue at the model's scale: the "
                    f"short side must be at least {self.min_side} px (half the model's input "
                    f"size of {self.pre.size} px). Use the original, full-size image; for "
                    f"96 px patches of lymph-node sections, such as PatchCamelyon's, use the "
                    f"patch model (--model {PATCH_MODEL}).")
        ratio = long / short
        if not self.tiled(w, h) and ratio > MAX_ASPECT:
            shown = f"{ratio:.2f}".rstrip("0").rstrip(".")
            return (f"{w}x{h} pixels has an aspect ratio of {shown}:1, over the limit of "
                    f"{MAX_ASPECT:g}:1 for an image predicted whole (the model would see only "
                    "its centre). Crop it into pieces closer to square (`bcd predict` can "
                    "also cut it into tiles: a --tile-size under half its short side, or "
                    "under its short side with --tile-factor 1).")
        return None

    def tiles(self, prepared: Prepared, chunk: int) -> Iterator[torch.Tensor]:
        """The model inputs of one prepared image, at most ``chunk`` at a time."""
        if prepared.x is not None:
            yield prepared.x
            return
        t = self.tile
        boxes = prepared.boxes or []
        for start in range(0, len(boxes), chunk):
            # Transformed lazily: a 10k x 10k image has thousands of tiles.
            yield torch.stack([self.transform(prepared.image[:, y:y + t, x:x + t])
                               for y, x in boxes[start:start + chunk]])


class _ItemDataset(torch.utils.data.Dataset):
    def __init__(self, items: list, preparer: Preparer):
        self.items, self.preparer = items, preparer

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Prepared:
        return self.preparer(i, self.items[i])


def _as_list(batch: list) -> list:
    return batch


# ----------------------------------------------------------------------------- predictor


class Predictor:
    """A trained model with the preprocessing and decision threshold it was saved with.

    Args:
        model: The network (``backend="torch"``), or an ONNX file or ONNX Runtime session
            (``backend="onnx"``).
        pre: The preprocessing the model was trained with.
        threshold: P(malignant) at or above which an image is called malignant.
        classes: Class names in output order.
        device: ``auto``, ``cpu``, ``cuda``...; ONNX models run where ONNX Runtime runs them.
        checkpoint: The :class:`bcd.checkpoint.Checkpoint` the model came from (its card:
            data, split, metrics), or None.
        arch: The architecture's name, when there is no checkpoint (e.g. from ONNX metadata).
        max_pixels: Images with more pixels are refused before decoding; None disables.
        backend: ``torch`` or ``onnx``.
        channels_last: Run convolutions in channels-last layout (faster with oneDNN on CPUs
            and with cuDNN); torch backend only.
    """

    def __init__(self, model, pre: Preprocessing, *, threshold: float = 0.5,
                 classes: list[str] | None = None, device: str | torch.device = "auto",
                 checkpoint: Checkpoint | None = None, arch: str | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, backend: str = "torch",
                 channels_last: bool = True):
        if backend not in ("torch", "onnx"):
            raise UserError(f"backend={backend!r}: use 'torch' or 'onnx'.")
        self.backend = backend
        if backend == "onnx":
            from .export import OnnxModel

            if not isinstance(model, OnnxModel):
                model = OnnxModel(model, device=str(device))
            self.device = torch.device("cpu")  # ONNX Runtime moves data itself
            channels_last = False
        else:
            self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.pre = pre
        self.threshold = float(threshold)
        self.threshold_source = "given"
        self.classes = list(classes or CLASSES)
        self.checkpoint = checkpoint
        self.arch = checkpoint.arch if checkpoint is not None else (
            arch or type(model).__name__)
        self.max_pixels = max_pixels
        self._by_threads: dict[int, Predictor] = {}  # for_lanes' sessions, by threads a run
        self._transform: Callable | None = None
        # Autocast on CUDA only: a CPU answers in float32, so its numbers match ONNX Runtime's.
        self.dtype = amp_dtype("auto", self.device) if self.device.type == "cuda" else None

    @property
    def transform(self) -> Callable:
        """The per-image evaluation transform (PIL image or uint8 tensor -> normalised
        float32 ``(3, size, size)``), built on first use: it needs torchvision, whose import
        (about 2 s) ``bcd slide`` and the model card never pay for."""
        if self._transform is None:
            self._transform = build_eval_transform(pre=self.pre)
        return self._transform

    @transform.setter
    def transform(self, value: Callable) -> None:
        self._transform = value

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", *,
                        sha256: str | None = None, cache_dir: str | Path | None = None,
                        progress: bool = True, **kwargs) -> Predictor:
        """Loads a checkpoint written by ``bcd train`` (``weights_only=True``).

        The threshold is the one chosen on validation and stored by ``bcd evaluate``; a
        checkpoint that has none uses 0.5 and says so in ``threshold_source``.

        Args:
            path: A local file, an ``http(s)://`` URL or a Google Drive link. URLs are
                downloaded once into the cache (see :func:`fetch_checkpoint`); a
                ``#sha256=HEX`` fragment is checked like ``sha256``. A ``.onnx`` file is
                handed to :meth:`from_onnx`.
            device: ``auto``, ``cpu``, ``cuda``...
            sha256: Expected SHA-256 of the file, checked before it is loaded.
            cache_dir: Where downloads are kept (default ``$BCD_CACHE`` or
                ``~/.cache/breast_cancer_detection``).
            progress: Show a download progress bar.
            **kwargs: Passed to :class:`Predictor` (``max_pixels``, ``channels_last``).

        Raises:
            CheckpointError: missing, damaged or wrong file, a failed download, or a file
                holding pickled Python objects (refused: they could run code).
        """
        if urllib.parse.urldefrag(str(path))[0].lower().endswith(".onnx"):
            return cls.from_onnx(path, device=device, sha256=sha256, cache_dir=cache_dir,
                                 progress=progress, **kwargs)
        local = local_file(path, sha256=sha256, cache=cache_dir, progress=progress)
        return cls.from_loaded(load_checkpoint(local), device=device, **kwargs)

    trained_model = None
    """The :class:`bcd.pretrained.TrainedModel` registry entry this predictor was loaded from
    by :meth:`from_pretrained` (its intended use and scale, for the model card), or None."""

    @classmethod
    def from_pretrained(cls, name: str | None = None, device: str = "auto", *,
                        cache_dir: str | Path | None = None, progress: bool = True,
                        slides: bool = False, **kwargs) -> Predictor:
        """Loads a named trained model from the registry (``bcd models --trained``).

        The bundled model needs no training and no network; a registry entry with a URL is
        downloaded once into the cache. Either way the file is checked against the registry's
        SHA-256 before it is loaded.

        Args:
            name: A registry name such as ``"pcam-patch-cnn"``; None for the default model
                (for images, or for whole slides when ``slides``).
            device: ``auto``, ``cpu``, ``cuda``...
            cache_dir: Where downloads are kept (default ``$BCD_CACHE`` or
                ``~/.cache/breast_cancer_detection``).
            progress: Show a download progress bar.
            **kwargs: Passed to :class:`Predictor` (``max_pixels``, ``channels_last``).

        Raises:
            TrainedModelError: unknown name (the known ones are listed), a missing file, or
                a file that is not the one the registry names.
        """
        from .pretrained import resolve_trained, trained_model

        entry = trained_model(name, slides=slides)
        local = resolve_trained(entry.name, cache=cache_dir, progress=progress)
        if local.suffix.lower() == ".onnx":
            pred = cls.from_onnx(local, device=device, **kwargs)
        else:
            pred = cls.from_loaded(load_checkpoint(local), device=device, **kwargs)
        pred.trained_model = entry
        return pred

    @classmethod
    def from_loaded(cls, ckpt: Checkpoint, device: str = "auto", **kwargs) -> Predictor:
        """A Predictor for a checkpoint already loaded with :func:`bcd.load_checkpoint`."""
        pred = cls(ckpt.build_model(), ckpt.pre(),
                   threshold=0.5 if ckpt.threshold is None else ckpt.threshold,
                   classes=ckpt.classes, device=device, checkpoint=ckpt, **kwargs)
        pred.threshold_source = "default 0.5 (none stored)" if ckpt.threshold is None else (
            "chosen on validation")
        return pred

    @classmethod
    def from_onnx(cls, path: str | Path, device: str = "cpu", *, sha256: str | None = None,
                  cache_dir: str | Path | None = None, progress: bool = True,
                  **kwargs) -> Predictor:
        """Loads a model written by ``bcd export --onnx`` and runs it with ONNX Runtime.

        The preprocessing, classes and threshold come from the file's metadata.

        Args:
            path: A local ``.onnx`` file or a URL, as for :meth:`from_checkpoint`.
            device: ``cpu``, or ``cuda`` when onnxruntime-gpu is installed.
            sha256: Expected SHA-256 of the file.
            cache_dir: Where downloads are kept.
            progress: Show a download progress bar.
            **kwargs: Passed to :class:`Predictor` (``max_pixels``).

        Raises:
            UserError: onnxruntime is missing, or the file is not one of our exports.
        """
        from .export import OnnxModel
        from .int8 import gate_holds

        local = local_file(path, sha256=sha256, cache=cache_dir, progress=progress)
        model = OnnxModel(local, device=device)
        meta = model.metadata
        if meta.get("int8") is not None and not gate_holds(meta["int8"]):
            raise UserError(f"{path}: an int8 model that did not pass today's accuracy gate "
                            "(or whose gate figures are missing); use the float32 export, or "
                            "export it again with `bcd export --int8`.")
        threshold = meta.get("threshold")
        pred = cls(model, Preprocessing(size=meta["size"], resize=meta["resize"],
                                        mean=meta["mean"], std=meta["std"]),
                   threshold=0.5 if threshold is None else threshold, classes=meta["classes"],
                   backend="onnx", arch=meta.get("arch"), **kwargs)
        pred.threshold_source = "default 0.5 (none stored)" if threshold is None else (
            "chosen on validation")
        return pred

    def on_backend(self, backend: str = "auto", *, cache_dir: str | Path | None = None
                   ) -> Predictor:
        """This model on another backend, with the same preprocessing, threshold and card.

        ``onnx`` exports the checkpoint once into the cache (``onnx/`` under ``cache_dir``,
        default ``$BCD_CACHE`` or ``~/.cache/breast_cancer_detection``), checked against
        PyTorch within 1e-4, and runs it with ONNX Runtime, which scores small convolutional
        networks faster than PyTorch on a CPU (docs/benchmarks.md, "CPU inference").
        ``auto`` does that on a CPU when onnxruntime is installed and the model came from a
        checkpoint, and otherwise keeps this predictor, as does a failed export (with a
        warning). ``torch`` keeps a PyTorch predictor. Either ONNX choice runs the int8
        model instead when one for these weights passed its accuracy gate: one that ``bcd
        export --int8`` left in the cache, or the one the checkpoint carries (``--embed``; the
        bundled model does). ``float32`` is ``onnx`` without the int8 model.
        :attr:`backend_note` says which runs.

        Raises:
            UserError: ``onnx`` asked for and not possible (no onnxruntime, no checkpoint).
        """
        import importlib.util
        import warnings

        check_backend(backend)
        if backend == "float32" and self.backend == "onnx" and self.model.metadata.get("int8"):
            raise UserError("this model is an int8 ONNX file: float32 needs the checkpoint (or "
                            "its float32 export, `bcd export CKPT --onnx PATH`).")
        if backend == "torch" or self.backend == "onnx" or (
                backend == "auto" and (self.device.type != "cpu" or self.checkpoint is None
                                       or importlib.util.find_spec("onnxruntime") is None)):
            if backend == "torch" and self.backend != "torch":
                raise UserError("this model is an ONNX file: PyTorch needs its checkpoint.")
            return self
        if self.checkpoint is None:
            raise UserError("backend onnx needs the model's checkpoint to export it.")
        from .export import OnnxModel, cached_onnx, cached_onnx_path
        from .int8 import cached_int8, unpack_int8

        int8 = cached_onnx_path(self.checkpoint, cache_root(cache_dir), int8=True)
        model = None
        if backend != "float32":
            embedded = self.checkpoint.int8_onnx
            if not int8.is_file() and embedded:
                unpack_int8(self.checkpoint, int8)
            model, why = cached_int8(int8)
            # A damaged or outdated copy in the cache: the checkpoint's own model replaces it.
            if model is None and why and embedded and unpack_int8(self.checkpoint, int8):
                model, why = cached_int8(int8)
            if why:
                warnings.warn(f"{int8} {why}; running float32.", stacklevel=2)
        try:
            if model is None:
                model = OnnxModel(cached_onnx(self.checkpoint, cache_root(cache_dir)))
        except UserError as e:
            if backend != "auto":
                raise
            warnings.warn(f"ONNX export failed, PyTorch runs instead: {e}", stacklevel=2)
            return self
        pred = Predictor(model, self.pre, threshold=self.threshold,
                         classes=self.classes, checkpoint=self.checkpoint, backend="onnx",
                         max_pixels=self.max_pixels)
        pred.threshold_source = self.threshold_source
        pred.trained_model = self.trained_model
        return pred

    # ------------------------------------------------------------- what the model is for
    # The rules live in scope.py; these are the names every door calls.

    @property
    def model_name(self) -> str:
        """The registry name of a named trained model, else the architecture."""
        return self.trained_model.name if self.trained_model is not None else self.arch

    def scope(self) -> dict[str, str]:
        """What the model is for and not for, in its card's words (:func:`bcd.scope.
        model_scope`)."""
        return _scope.model_scope(self)

    def scope_warning(self, source: str, size: tuple[int, int] | None, tiles: int,
                      mpp: float | None = None, *, tile_size: int | None = None
                      ) -> str | None:
        """Why one image lies outside what the model was made for, or None
        (:func:`bcd.scope.scope_warning`)."""
        return _scope.scope_warning(self, source, size, tiles, mpp, tile_size=tile_size)

    def wrong_data_note(self, files: list[str | Path]) -> str | None:
        """One line for a whole run of BreakHis-named images given to a model of other
        tissue, or None (:func:`bcd.scope.wrong_data_note`)."""
        return _scope.wrong_data_note(self, files)

    def lanes(self, workers: int = 0) -> int:
        """How many threads each read and score whole batches side by side: 2 when inputs are
        read in this process (no ``workers``) for an ONNX Runtime model on a CPU of 2 or more
        cores, else 1 (see :func:`~breast_cancer_detection.data.datasets.run_lanes`).

        Two lanes whose model runs use half the cores each keep both cores busy: while one
        lane decodes or reads, the other's model runs undisturbed. A reading thread beside a
        model run on every core stalls the model's threads whenever it takes a core
        (docs/benchmarks.md). A PyTorch model keeps one lane: its thread count is
        process-wide.
        """
        if workers or self.backend != "onnx" or (os.cpu_count() or 1) < 2:
            return 1
        if "CUDAExecutionProvider" in self.model.session.get_providers():
            return 1
        return 2

    def for_lanes(self, lanes: int) -> Predictor:
        """The predictor each of ``lanes`` lanes scores with: this one for one lane; for more,
        the same model with each ONNX Runtime run on its share of the cores (a second
        session on the same file, made once and kept). A PyTorch predictor, or an ONNX model
        without a file, comes back as it is."""
        import copy

        from .export import OnnxModel

        if lanes <= 1 or self.backend != "onnx" or getattr(self.model, "path", None) is None:
            return self
        threads = max(1, (os.cpu_count() or 1) // lanes)
        if threads not in self._by_threads:
            pred = copy.copy(self)
            pred._by_threads = {}
            pred.model = OnnxModel(self.model.path, device=self.model.device, threads=threads)
            self._by_threads[threads] = pred
        return self._by_threads[threads]

    @property
    def backend_note(self) -> str:
        """Where the model runs, in words: ``PyTorch on cpu``, ``ONNX Runtime (CPU)``."""
        if self.backend == "onnx":
            providers = self.model.session.get_providers()
            where = "CUDA" if providers and providers[0].startswith("CUDA") else "CPU"
            gate = self.model.metadata.get("int8")
            return f"ONNX Runtime ({where}{', int8' if gate else ''})"
        return f"PyTorch on {self.device}"

    def predict_table(self, root: str | Path, table: pd.DataFrame, *, batch_size: int = 32,
                      workers: int = 0, progress: bool = True, tta: bool = False
                      ) -> pd.DataFrame:
        """P(malignant) for every row of an index or split table, batched.

        Args:
            tta: Average over the 8 flips/rotations of each image.

        Returns:
            The table with ``probability``, ``prediction`` (0/1 at the stored threshold) and
            ``error`` (empty, or why the image could not be read) columns added.
        """
        from tqdm.auto import tqdm

        table = table.reset_index(drop=True)
        if "target" not in table.columns:
            table = table.assign(target=0)
        ds = ImageTableDataset(root, table, self.transform, max_pixels=self.max_pixels)
        errors: dict[int, str] = {}
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                             collate_fn=collate_skip_bad)
        bar = tqdm(total=len(loader), desc="predict", unit="batch", disable=not progress)

        probs, rows = [], []
        for b in loader:
            # Unreadable files come back inside the batches, also from worker processes.
            errors.update(dict(b["bad"]))
            if b["x"] is not None:
                probs.append(self.probabilities(b["x"], tta=tta, batch_size=batch_size)[:, 1])
                rows.append(np.asarray(b["rows"]))
            bar.update(1)
        bar.close()
        prob = np.full(len(table), np.nan)
        if rows:
            prob[np.concatenate(rows).astype(int)] = np.concatenate(probs)
        result = table.copy()
        result["probability"] = prob
        result["prediction"] = np.where(np.isnan(prob), -1, (prob >= self.threshold).astype(int))
        result["error"] = [errors.get(i, "") for i in range(len(table))]
        # A read image without a finite answer is the model's failure: never a silent NaN.
        broken = np.flatnonzero(~np.isfinite(prob) & (result["error"] == "").to_numpy())
        result.loc[broken, "error"] = f"{NON_FINITE} (NaN or infinity)"
        result.loc[broken, "prediction"] = -1
        return result

    def predict(self, images, *, batch_size: int = 32, tta: bool = False,
                tile_factor: float | None = DEFAULT_TILE_FACTOR, tile_size: int | None = None,
                workers: int = 0, progress: bool = False, mpp: float | None = None,
                names: list[str] | None = None) -> list[Prediction]:
        """Predicts paths, folders, PIL images or arrays (one, or a list).

        Inputs are read and prepared by a DataLoader (``workers`` processes) and run in
        batches. Without workers, an ONNX Runtime model on a CPU of 2 or more cores runs in
        two lanes (:meth:`lanes`): each decodes a share of the images and scores them on half
        the cores. An input with no honest answer gives a Prediction with label ``"error"``,
        ``error`` saying why and NaN probabilities; the others carry on. That is: a file
        that cannot be read, or is not PNG, JPEG, TIFF, BMP or WebP; an image whose short
        side is under half the model's input size; one predicted whole whose long side is
        over ``MAX_ASPECT`` (10) times its short side; one that runs out of memory; and
        one for which the model outputs NaN or infinity.

        Large images are tiled rather than shrunk: when the short side is more than
        ``tile_factor`` tile sides, the image is cut at its own resolution into square tiles
        of side ``tile_size`` (default ``pre.resize``, or ``pre.size`` without a resize) that
        overlap by half a tile, the last row and column flush with the edges. Each tile goes
        through the evaluation transform, and the tile probabilities are averaged; the
        per-tile P(malignant) is kept in ``heatmap``. This assumes the image's pixels are the
        size of the pixels the model was fed; for BreakHis-trained models (700x460 images
        shrunk to a 256 short side) ``tile_size=460`` matches the training field of view.

        Args:
            images: A path, folder (searched recursively), PIL image or HxW(xC) array, or a
                list of them.
            batch_size: Images read per step, and model inputs per forward pass.
            tta: Average over the 8 flips and quarter turns of each (tile's) model input.
            tile_factor: See above; None never tiles.
            tile_size: Tile side in image pixels; None uses the training scale.
            workers: DataLoader worker processes (0 reads in this process).
            progress: Show a progress bar over the images.
            mpp: The images' micrometres per pixel, when known: checked against the model's
                scale for each answer's ``warning`` (:meth:`scope_warning`), not used to
                rescale.
            names: A file name for each input, for images given in memory (an upload's
                name): the answers' ``source``, which the warning also reads.
        """
        from tqdm.auto import tqdm

        if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
            raise UserError(f"mpp={mpp}: micrometres per pixel must be a positive number, "
                            "e.g. 0.25 (40x scanners) or 0.5 (20x).")

        if isinstance(images, (list, tuple)):
            items = [x for i in images for x in (collect_images([i]) if _is_path(i) else [i])]
        else:
            items = collect_images([images]) if _is_path(images) else [images]
        if names is not None and len(names) != len(items):
            raise UserError(f"names: {len(names)} for {len(items)} images; give one each.")
        names = names or [str(x) if isinstance(x, (str, Path)) else f"<image {i}>"
                          for i, x in enumerate(items)]
        preparer = Preparer(self.pre, self.transform, max_pixels=self.max_pixels,
                             tile_factor=tile_factor, tile_size=tile_size)
        tile_probs: dict[int, list[np.ndarray]] = {}
        prepared: dict[int, Prepared] = {}

        def score(model: Predictor, batch: list[Prepared]) -> None:
            """Scores the model inputs of ``batch`` (tiles of several images share passes)."""
            buffer: list[torch.Tensor] = []
            owners: list[int] = []

            def flush() -> None:
                if buffer:
                    probs = model.probabilities(torch.cat(buffer), tta=tta,
                                                batch_size=batch_size)
                    for owner, p in zip(owners, probs):
                        tile_probs.setdefault(owner, []).append(p)
                    buffer.clear()
                    owners.clear()

            for item in batch:
                prepared[item.index] = item
                if item.error is not None:
                    continue
                for x in preparer.tiles(item, batch_size):
                    buffer.append(x)
                    owners.extend([item.index] * len(x))
                    if len(owners) >= batch_size:
                        flush()
                item.x = item.image = None  # keep only the answer, not the pixels
            flush()

        lanes = self.lanes(workers) if len(items) > 1 else 1
        with tqdm(total=len(items), desc="predict", unit="image", disable=not progress) as bar:
            if lanes > 1:
                # Each lane decodes a share of the images and scores them on its cores.
                model = self.for_lanes(lanes)
                # Four or more chunks a lane, so that the lanes fall out of step: one decodes
                # while the other scores (two halves would decode, then score, together).
                step = max(1, min(batch_size, math.ceil(len(items) / (4 * lanes))))

                def work(k: int) -> int:
                    batch = [preparer(i, items[i])
                             for i in range(k * step, min(len(items), (k + 1) * step))]
                    score(model, batch)
                    return len(batch)

                run_lanes(lanes, math.ceil(len(items) / step), work, bar)
            else:
                loader = torch.utils.data.DataLoader(
                    _ItemDataset(items, preparer), batch_size=batch_size, num_workers=workers,
                    collate_fn=_as_list)
                for batch in loader:
                    score(self, batch)
                    bar.update(len(batch))
        results = [self._result(names[i], prepared[i], tile_probs.get(i))
                   for i in range(len(items))]
        for r in results:
            if r.error is None:
                r.warning = self.scope_warning(r.source, r.size, r.tiles, mpp,
                                               tile_size=preparer.tile)
        return results

    def _result(self, name: str, item: Prepared, probs: list[np.ndarray] | None) -> Prediction:
        if item.error is not None or not probs:
            return Prediction(name, dict.fromkeys(self.classes, float("nan")), "error",
                              self.threshold, error=item.error or "no prediction", tiles=0)
        p = np.stack(probs)
        if not np.isfinite(p).all():
            # NaN >= threshold is False: without this check a broken model answers "benign".
            return Prediction(name, dict.fromkeys(self.classes, float("nan")), "error",
                              self.threshold, tiles=0,
                              error=f"{NON_FINITE} (NaN or "
                              "infinity), so there is no answer; the checkpoint's weights are "
                              "damaged or the model overflowed. Check the checkpoint (retrain, "
                              "or download it again); run on another device to rule out the "
                              "hardware.")
        mean = p.mean(0)
        heatmap = p[:, 1].reshape(item.grid) if item.grid is not None else None
        return Prediction(name, {c: float(v) for c, v in zip(self.classes, mean)},
                          self.classes[int(mean[1] >= self.threshold)], self.threshold,
                          tiles=len(p), heatmap=heatmap, size=item.size)

    @torch.inference_mode()
    def probabilities(self, x: torch.Tensor, *, tta: bool = False,
                       batch_size: int = 32) -> np.ndarray:
        """Softmax outputs ``(N, classes)`` for a batch of prepared model inputs (the output
        of ``self.transform``), run ``batch_size`` at a time; averaged over the 8 flips and
        quarter turns with ``tta``."""
        def one_view(xk: torch.Tensor) -> np.ndarray:
            return np.concatenate([self._forward(xk[start:start + batch_size])
                                   for start in range(0, len(xk), batch_size)]
                                  or [np.zeros((0, len(self.classes)))])

        return view_mean(one_view, x, 8 if tta else 1)

    def _forward(self, x: torch.Tensor) -> np.ndarray:
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.model(x).float()
        return torch.softmax(logits, 1).cpu().numpy()


def _is_path(x) -> bool:
    return isinstance(x, (str, Path))


"""The :class:`Predictor`: a trained model with its preprocessing and decision threshold,
loaded from a checkpoint, the registry or an ONNX file, moved between backends, and run on
images (:meth:`Predictor.predict`) or on an index table (:meth:`Predictor.predict_table`)."""

from __future__ import annotations

import math
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import scope as _scope
from ..checkpoint import Checkpoint, amp_dtype, load_checkpoint
from ..data.breakhis import CLASSES
from ..data.datasets import (
    DEFAULT_MAX_PIXELS,
    ImageTableDataset,
    collate_skip_bad,
    run_lanes,
)
from ..data.transforms import Preprocessing, build_eval_transform, view_mean
from ..errors import UserError
from ..hub import local_file
from .backends import onnx_file, onnx_model, select_backend, torch_model
from .prepare import DEFAULT_TILE_FACTOR, Prepared, Preparer, input_items, item_batches
from .results import Prediction, table_answers, tile_answer


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
            self.model = onnx_model(model, device)
            self.device = torch.device("cpu")  # ONNX Runtime moves data itself
            channels_last = False
        else:
            self.model, self.device = torch_model(model, device, channels_last)
        self.channels_last = channels_last
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
        from ..pretrained import resolve_trained, trained_model

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
        local = local_file(path, sha256=sha256, cache=cache_dir, progress=progress)
        model = onnx_file(local, path, device)
        meta = model.metadata
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
        :attr:`backend_note` says which runs. The rule is :func:`.backends.select_backend`'s.

        Raises:
            UserError: ``onnx`` asked for and not possible (no onnxruntime, no checkpoint).
        """
        model = select_backend(backend, current=self.backend, model=self.model,
                               device=self.device, checkpoint=self.checkpoint,
                               cache_dir=cache_dir, stacklevel=3)
        if model is None:
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

        from ..export import OnnxModel

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
        return table_answers(table, prob, errors, self.threshold)

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
        if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
            raise UserError(f"mpp={mpp}: micrometres per pixel must be a positive number, "
                            "e.g. 0.25 (40x scanners) or 0.5 (20x).")
        items = input_items(images)
        if names is not None and len(names) != len(items):
            raise UserError(f"names: {len(names)} for {len(items)} images; give one each.")
        names = names or [str(x) if isinstance(x, (str, Path)) else f"<image {i}>"
                          for i, x in enumerate(items)]
        preparer = Preparer(self.pre, self.transform, max_pixels=self.max_pixels,
                            tile_factor=tile_factor, tile_size=tile_size)
        scores = _Scores(preparer, batch_size=batch_size, tta=tta)
        scores.run(self, items, workers=workers, progress=progress)
        results = [scores.answer(self, i, names[i]) for i in range(len(items))]
        for r in results:
            if r.error is None:
                r.warning = self.scope_warning(r.source, r.size, r.tiles, mpp,
                                               tile_size=preparer.tile)
        return results

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


# ----------------------------------------------------------------------------- predict's loop


class _Scores:
    """The model's outputs for the inputs of one :meth:`Predictor.predict` call, gathered by
    input index: read and scored in batches, or in lanes side by side."""

    def __init__(self, preparer: Preparer, *, batch_size: int, tta: bool):
        self.preparer, self.batch_size, self.tta = preparer, batch_size, tta
        self.tile_probs: dict[int, list[np.ndarray]] = {}
        self.prepared: dict[int, Prepared] = {}

    def run(self, predictor: Predictor, items: list, *, workers: int, progress: bool) -> None:
        """Reads, prepares and scores every input, in lanes when :meth:`Predictor.lanes` says
        so, else in batches from a DataLoader of ``workers`` processes."""
        from tqdm.auto import tqdm

        lanes = predictor.lanes(workers) if len(items) > 1 else 1
        with tqdm(total=len(items), desc="predict", unit="image", disable=not progress) as bar:
            if lanes > 1:
                self._run_lanes(predictor.for_lanes(lanes), items, lanes, bar)
            else:
                for batch in item_batches(items, self.preparer, batch_size=self.batch_size,
                                          workers=workers):
                    self.score(predictor, batch)
                    bar.update(len(batch))

    def _run_lanes(self, model: Predictor, items: list, lanes: int, bar) -> None:
        """Each lane decodes a share of the images and scores them on its cores."""
        # Four or more chunks a lane, so that the lanes fall out of step: one decodes
        # while the other scores (two halves would decode, then score, together).
        step = max(1, min(self.batch_size, math.ceil(len(items) / (4 * lanes))))

        def work(k: int) -> int:
            batch = [self.preparer(i, items[i])
                     for i in range(k * step, min(len(items), (k + 1) * step))]
            self.score(model, batch)
            return len(batch)

        run_lanes(lanes, math.ceil(len(items) / step), work, bar)

    def score(self, model: Predictor, batch: list[Prepared]) -> None:
        """Scores the model inputs of ``batch`` (tiles of several images share passes)."""
        buffer: list[torch.Tensor] = []
        owners: list[int] = []

        def flush() -> None:
            if buffer:
                probs = model.probabilities(torch.cat(buffer), tta=self.tta,
                                            batch_size=self.batch_size)
                for owner, p in zip(owners, probs):
                    self.tile_probs.setdefault(owner, []).append(p)
                buffer.clear()
                owners.clear()

        for item in batch:
            self.prepared[item.index] = item
            if item.error is not None:
                continue
            for x in self.preparer.tiles(item, self.batch_size):
                buffer.append(x)
                owners.extend([item.index] * len(x))
                if len(owners) >= self.batch_size:
                    flush()
            item.x = item.image = None  # keep only the answer, not the pixels
        flush()

    def answer(self, predictor: Predictor, index: int, name: str) -> Prediction:
        """The answer for input ``index``, named ``name``, at the predictor's threshold."""
        item = self.prepared[index]
        return tile_answer(name, self.tile_probs.get(index), predictor.classes,
                           predictor.threshold, error=item.error, grid=item.grid,
                           size=item.size)

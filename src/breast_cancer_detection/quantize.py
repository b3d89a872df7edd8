"""int8 ONNX models: static quantization calibrated on images, kept only behind an accuracy gate.

``bcd export CKPT --onnx OUT --int8 --calibration TRAIN_DIR --gate VALID_DIR`` exports the
checkpoint, quantizes it with ONNX Runtime (QDQ format, per-channel int8 weights, uint8
activations whose ranges are calibrated on training images; the first and last weighted
layers stay float32), and scores the gate images with
both models. The int8 model is written only if it keeps the float32 model's answers:

- with labelled gate images (both classes): ROC AUC within :data:`AUC_TOLERANCE` of float32
  and the same label at the model's threshold for :data:`SAME_LABEL` of the images;
- without labels: every P(malignant) within :data:`PROB_TOLERANCE` of float32.

The gate's figures and the weights' digest go into the file's metadata (``int8``), and a
copy goes into the cache beside the checkpoint's float32 export, so that
``Predictor.on_backend("auto")`` (``bcd slide``, ``bcd predict``, ``bcd serve``) runs the int8
model for that checkpoint from then on; :func:`embed_int8` (``--embed``) also stores it in the
checkpoint file, from which it is copied into the cache on any machine.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .checkpoint import Checkpoint, load_checkpoint
from .errors import UserError
from .export import (
    ExportError,
    cached_onnx_path,
    export_onnx,
    import_optional,
    weights_digest,
    write_onnx_metadata,
)
from .files import atomic_write
from .int8 import AUC_TOLERANCE, PROB_TOLERANCE, SAME_LABEL, int8_of


@dataclass
class Gate:
    """What the int8 model was checked on, and how it did against float32."""

    images: int
    rule: str
    auc_float32: float | None
    auc_int8: float | None
    max_abs_diff: float
    mean_abs_diff: float
    same_label: float
    passed: bool

    def summary(self) -> str:
        auc = ("" if self.auc_float32 is None else
               f"ROC AUC {self.auc_float32:.4f} (float32) vs {self.auc_int8:.4f} (int8); ")
        return (f"{self.images} gate images: {auc}largest |P difference| "
                f"{self.max_abs_diff:.4f}, mean {self.mean_abs_diff:.4f}; same label for "
                f"{self.same_label:.1%}")


def _table(folder: str | Path, limit: int | None, seed: int) -> pd.DataFrame:
    """Images under ``folder`` as an index table (labels where the layout gives them), a
    seeded sample of ``limit`` of them."""
    from .data.breakhis import DatasetError, build_index
    from .inference import collect_images

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; give a folder of images (0/ and 1/, or "
                        "benign/ and malignant/, for the gate's labels).")
    try:
        table = build_index(folder)[["path", "target"]]
    except (DatasetError, KeyError, ValueError):
        files = collect_images([folder])
        table = pd.DataFrame({"path": [f.relative_to(folder).as_posix() for f in files],
                              "target": -1})
    if table.empty:
        raise UserError(f"{folder}: no images to calibrate or check the int8 model on.")
    if limit is not None and len(table) > limit:
        table = table.sample(n=limit, random_state=seed).reset_index(drop=True)
    return table


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over prepared images, a batch at a time."""

    def __init__(self, input_name: str, batches: list[np.ndarray]):
        self.input_name = input_name
        self._it = iter(batches)

    def get_next(self):
        x = next(self._it, None)
        return None if x is None else {self.input_name: x}


def _prepared(ckpt: Checkpoint, folder: Path, table: pd.DataFrame, batch_size: int = 32
              ) -> list[np.ndarray]:
    from .data.datasets import ImageTableDataset, collate_skip_bad
    from .data.transforms import build_eval_transform

    ds = ImageTableDataset(folder, table.assign(target=0),
                           build_eval_transform(pre=ckpt.pre()))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate_skip_bad)
    return [b["x"].numpy() for b in loader if b["x"] is not None]


def run_gate(float_model: Path, int8_model: Path, folder: Path, table: pd.DataFrame, *,
             progress: bool = False) -> Gate:
    """Scores the gate images with both ONNX models and applies the tolerances."""
    from .inference import Predictor

    probs = []
    for path in (float_model, int8_model):
        pred = Predictor.from_onnx(path, progress=False)
        out = pred.predict_table(folder, table, progress=progress)
        probs.append(out["probability"].to_numpy())
    a, b = probs
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any():
        raise UserError(f"{folder}: none of the gate images could be read.")
    threshold = Predictor.from_onnx(float_model, progress=False).threshold
    return judge_gate(a[ok], b[ok], table["target"].to_numpy()[ok], threshold)


def judge_gate(a: np.ndarray, b: np.ndarray, y: np.ndarray, threshold: float) -> Gate:
    """The gate's verdict on one set of gate images.

    Args:
        a: float32 P(malignant) of each image.
        b: int8 P(malignant) of the same images.
        y: Their labels (0/1), or -1 where unknown.
        threshold: The model's decision threshold.
    """
    from .metrics import roc_auc

    diff = np.abs(a - b)
    same = float(np.mean((a >= threshold) == (b >= threshold)))
    labelled = set(np.unique(y)) == {0, 1}
    if labelled:
        auc_a, auc_b = roc_auc(y, a), roc_auc(y, b)
        passed = auc_a - auc_b <= AUC_TOLERANCE and same >= SAME_LABEL
        rule = (f"ROC AUC at most {AUC_TOLERANCE} below float32, and the same label at the "
                f"threshold for at least {SAME_LABEL:.0%} of the images")
    else:
        auc_a = auc_b = None
        passed = float(diff.max()) <= PROB_TOLERANCE
        rule = f"every P(malignant) within {PROB_TOLERANCE} of float32 (no labels)"
    return Gate(images=len(a), rule=rule, auc_float32=auc_a, auc_int8=auc_b,
                max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                same_label=same, passed=bool(passed))


def _ends(model: Path) -> list[str]:
    """The first and the last weighted layer (convolution or matrix product) of a graph.

    They stay float32: the first sees the normalised image, whose int8 rounding the whole
    network then amplifies, and the last makes the logits. Quantized as well, the bundled PCam
    model fails its gate on PCam valid (docs/benchmarks.md, "int8 models": ROC AUC 0.9331
    against 0.9458, 93.0% of the labels kept).
    """
    onnx = import_optional("onnx")
    names = [n.name for n in onnx.load(str(model)).graph.node
             if n.op_type in ("Conv", "Gemm", "MatMul")]
    return sorted({names[0], names[-1]}) if names else []


class GateFailed(ExportError):
    """The int8 model failed its accuracy gate; ``gate`` holds by how much."""

    def __init__(self, message: str, gate: Gate):
        super().__init__(message)
        self.gate = gate


def _quantize(tmp: Path, cal: list[np.ndarray], all_layers: bool, settings: dict | None
              ) -> None:
    """``tmp/float32.onnx`` quantized into ``tmp/int8.onnx`` (see :func:`export_int8`)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(tmp / "float32.onnx"), str(tmp / "pre.onnx"))
        source = tmp / "pre.onnx"
    except Exception:  # noqa: BLE001 - optional graph clean-up; quantize without it
        source = tmp / "float32.onnx"
    root = logging.getLogger()
    level = root.level
    # ONNX Runtime's quantizer logs a warning on the root logger for every normalisation
    # layer it cannot fold (DenseNet has 120): not the user's concern.
    root.setLevel(logging.ERROR)
    options = {"quant_format": QuantFormat.QDQ, "per_channel": True,
               "weight_type": QuantType.QInt8, "activation_type": QuantType.QUInt8,
               "nodes_to_exclude": [] if all_layers else _ends(source), **(settings or {})}
    try:
        quantize_static(str(source), str(tmp / "int8.onnx"), _Calibration("image", cal),
                        **options)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises many kinds
        raise ExportError(f"int8 quantization failed: {type(e).__name__}: {e}") from e
    finally:
        root.setLevel(level)


def export_int8(checkpoint: str | Path | Checkpoint, out: str | Path, *,
                calibration: str | Path, gate: str | Path, calibration_images: int = 256,
                gate_images: int | None = None, cache_dir: str | Path | None = None,
                all_layers: bool = False, seed: int = 0, progress: bool = True,
                settings: dict | None = None) -> tuple[Path, Gate]:
    """Writes an int8 ONNX model of a checkpoint if it passes the accuracy gate.

    Args:
        checkpoint: A checkpoint path or a loaded :class:`Checkpoint`.
        out: The int8 ``.onnx`` to write.
        calibration: A folder of training images; ``calibration_images`` of them (seeded
            sample) set the activation ranges.
        gate: A folder of held-out images, labelled (``0/``, ``1/``, ``benign/``...) for the
            AUC rule, or not for the probability rule; ``gate_images`` of them, or all.
        cache_dir: Where the copy for ``Predictor.on_backend`` goes (default the download
            cache).
        all_layers: Quantize the first and last weighted layers too (see :func:`_ends`).
        seed: Which images are sampled.
        progress: Progress bars while the gate images are scored.
        settings: Keyword arguments for ONNX Runtime's ``quantize_static`` that replace
            these defaults (e.g. ``{"calibrate_method": CalibrationMethod.Percentile}``,
            ``{"reduce_range": True}``); ``benchmarks/int8_variants.py`` compares some.

    Returns:
        The path written and the gate's result.

    Raises:
        GateFailed: the int8 model failed the gate (nothing is written); an ExportError.
        ExportError: quantization failed.
        UserError: onnx/onnxruntime missing, or no images in a folder.
    """
    import_optional("onnxruntime")
    from .hub import cache_root

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    out = Path(out)
    cal_dir, gate_dir = Path(calibration), Path(gate)
    cal = _prepared(ckpt, cal_dir, _table(cal_dir, calibration_images, seed))
    if not cal:
        raise UserError(f"{cal_dir}: none of the calibration images could be read.")
    gate_table = _table(gate_dir, gate_images, seed)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        export_onnx(ckpt, tmp / "float32.onnx", verify=True)
        _quantize(tmp, cal, all_layers, settings)
        result = run_gate(tmp / "float32.onnx", tmp / "int8.onnx", gate_dir, gate_table,
                          progress=progress)
        if not result.passed:
            raise GateFailed(f"int8 model not written: it fails the accuracy gate ("
                             f"{result.rule}): {result.summary()}. Use the float32 export.",
                             result)
        info = {**asdict(result), "calibration_images": int(sum(len(b) for b in cal)),
                "calibration": cal_dir.name, "gate": gate_dir.name,
                "settings": {k: str(v) for k, v in (settings or {}).items()},
                "weights": weights_digest(ckpt)}
        write_onnx_metadata(tmp / "int8.onnx", int8=info)
        data = (tmp / "int8.onnx").read_bytes()
        cached = cached_onnx_path(ckpt, cache_root(cache_dir), int8=True)
        for path in (out, cached):  # atomically: a half-copied model must never be loaded
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: f.write(data))
    return out, result


def embed_int8(checkpoint: str | Path, onnx: str | Path) -> Path:
    """Stores the int8 model ``onnx`` (written by :func:`export_int8` for these weights) in
    the checkpoint file, which is rewritten atomically; ``--backend auto`` then runs it on
    any CPU, with no calibration data and nothing in the cache.

    Raises:
        ExportError: the model is not this checkpoint's, or its gate does not hold.
    """
    from .checkpoint import save_checkpoint

    ckpt = load_checkpoint(checkpoint)
    data = Path(onnx).read_bytes()
    why = int8_of(ckpt, data)
    if why is not None:
        raise ExportError(f"{onnx} not embedded in {checkpoint}: {why}.")
    ckpt.int8_onnx = data
    return save_checkpoint(ckpt, checkpoint)



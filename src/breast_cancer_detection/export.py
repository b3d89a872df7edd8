"""ONNX export of a checkpoint, and the ONNX Runtime model the Predictor runs it with."""

from __future__ import annotations

import importlib
import inspect
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import Checkpoint
from .errors import UserError, install_hint

ONNX_FORMAT = "bcd-onnx/1"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
_META_KEYS = ("format", "arch", "size", "resize", "mean", "std", "classes", "threshold",
              "mpp", "int8", "input", "output")


class ExportError(UserError, RuntimeError):
    """The model could not be exported, or the export does not reproduce the model."""


def import_optional(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{name} is not installed: pip install onnx onnxruntime, or "
                        f"{install_hint('onnx')}.") from None


def export_onnx(checkpoint: str | Path | Checkpoint, out: str | Path, *, opset: int = 17,
                verify: bool = True) -> Path:
    """Writes a checkpoint's model as ONNX, with dynamic batch size and its preprocessing.

    The graph takes ``image``: float32 ``(N, 3, size, size)``, already resized, cropped and
    normalised as :func:`~breast_cancer_detection.data.transforms.build_eval_transform` does,
    and returns ``logits`` ``(N, classes)``. The metadata properties (JSON values) carry
    ``format``, ``arch``, ``size``, ``resize``, ``mean``, ``std``, ``classes``,
    ``threshold``, ``input`` and ``output``, so the file alone is enough for
    :meth:`Predictor.from_onnx <breast_cancer_detection.inference.Predictor.from_onnx>`.

    Args:
        checkpoint: A checkpoint path, or a loaded :class:`Checkpoint`, written by
            ``bcd train``.
        out: The ``.onnx`` file to write (atomically).
        opset: ONNX opset version.
        verify: Run the export with ONNX Runtime on a batch of 3 random inputs and check
            that the probabilities match PyTorch's within 1e-4 (needs onnxruntime).

    Returns:
        The path written.

    Raises:
        ExportError: the exporter failed, or the exported model disagrees with PyTorch.
    """
    import tempfile

    from .checkpoint import load_checkpoint
    from .files import atomic_write

    onnx = import_optional("onnx")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    model = ckpt.build_model()
    pre = ckpt.pre()
    size = pre.size
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as tmp_dir:
            tmp = Path(tmp_dir) / out.name
            with warnings.catch_warnings():
                # The legacy exporter announces its own deprecation and traces Python
                # branches; neither matters for these fixed-shape feed-forward models.
                warnings.simplefilter("ignore")
                # dynamo=False: the TorchScript exporter needs only torch and onnx. The dynamo
                # exporter (torch's default since 2.9) also needs onnxscript, which is not
                # among our dependencies; switch when the legacy one is removed. Torch before
                # 2.5 has no `dynamo` argument and only the legacy exporter.
                legacy = ({"dynamo": False}
                          if "dynamo" in inspect.signature(torch.onnx.export).parameters else {})
                torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(tmp),
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes={INPUT_NAME: {0: "batch"},
                                                OUTPUT_NAME: {0: "batch"}},
                                  opset_version=opset, **legacy)
            proto = onnx.load(str(tmp))
            meta = {"format": ONNX_FORMAT, "arch": ckpt.arch, "size": size,
                    "resize": pre.resize, "mean": list(pre.mean), "std": list(pre.std),
                    "classes": list(ckpt.classes), "threshold": ckpt.threshold,
                    "mpp": ckpt.mpp,
                    "input": f"{INPUT_NAME}: float32 (N, 3, {size}, {size}), normalised",
                    "output": f"{OUTPUT_NAME}: (N, classes), apply softmax"}
            del proto.metadata_props[:]
            _set_metadata(proto, meta)
            onnx.checker.check_model(proto)
            onnx.save(proto, str(tmp))
            if verify:
                _verify(model, tmp, size)
            atomic_write(out, lambda f: f.write(tmp.read_bytes()))
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - exporter failures come in many types
        raise ExportError(f"exporting {ckpt.arch} to {out} failed ({type(e).__name__}: "
                          f"{e}).") from e
    return out


def _verify(model: nn.Module, path: Path, size: int) -> None:
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = torch.softmax(model(x), 1).numpy()
    if not np.isfinite(expected).all():  # no ONNX opset can fix that
        raise ExportError(f"{path.name} not exported: the model's own PyTorch output is not "
                          "finite (NaN or infinity) on test inputs, so its weights are broken. "
                          "Check the checkpoint (retrain, or export an earlier one).")
    got = torch.softmax(OnnxModel(path)(x), 1).numpy()
    diff = float(np.abs(expected - got).max())
    if not diff <= 1e-4:
        raise ExportError(f"the ONNX export of {path.name} differs from PyTorch by {diff:.2g} "
                          "in probability (limit 1e-4); try another --opset.")


def weights_digest(ckpt: Checkpoint) -> str:
    """SHA-256 of a checkpoint's architecture, input size and weights: the key of its cached
    ONNX export (a retrained model gets another)."""
    import hashlib

    h = hashlib.sha256(f"{ckpt.arch}|{ckpt.pre().size}|{ONNX_FORMAT}".encode())
    for name, value in sorted(ckpt.state_dict.items()):
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def cached_onnx_path(ckpt: Checkpoint, cache: str | Path, *, int8: bool = False) -> Path:
    """Where the cache keeps the ONNX export of ``ckpt`` (``cache/onnx/ARCH-DIGEST.onnx``;
    ``.int8.onnx`` for the int8 model ``bcd export --int8`` leaves there, or that a
    checkpoint carrying one is unpacked to)."""
    suffix = ".int8.onnx" if int8 else ".onnx"
    return Path(cache) / "onnx" / f"{ckpt.arch}-{weights_digest(ckpt)[:16]}{suffix}"


def cached_onnx(ckpt: Checkpoint, cache: str | Path) -> Path:
    """The ONNX export of ``ckpt`` in ``cache/onnx/``, written (and checked against PyTorch
    within 1e-4) the first time, then reused.

    Raises:
        ExportError: the export failed or disagrees with PyTorch.
        UserError: onnx or onnxruntime is not installed.
    """
    path = cached_onnx_path(ckpt, cache)
    if not path.is_file():
        export_onnx(ckpt, path, verify=True)
    return path


def write_onnx_metadata(path: str | Path, **values: Any) -> Path:
    """Sets metadata properties (JSON values) of an ONNX file, replacing those of the same
    name, atomically."""
    from .files import atomic_write

    onnx = import_optional("onnx")
    proto = onnx.load(str(path))
    _set_metadata(proto, values)
    return atomic_write(path, lambda f: f.write(proto.SerializeToString()))


def _set_metadata(proto, values: dict[str, Any]) -> None:
    """Sets metadata properties of a ModelProto to JSON ``values``, replacing same names."""
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    for key, value in keep + [(k, json.dumps(v)) for k, v in values.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def read_onnx_metadata(path_or_session) -> dict[str, Any]:
    """The preprocessing and decision metadata :func:`export_onnx` stored in a model.

    Raises:
        UserError: the file is not one of our exports.
    """
    session = path_or_session
    if isinstance(path_or_session, (str, Path)):
        session = OnnxModel(path_or_session).session
    raw = session.get_modelmeta().custom_metadata_map
    if raw.get("format") != json.dumps(ONNX_FORMAT):
        raise UserError(f"{path_or_session}: not a model written by `bcd export --onnx` (no "
                        f"'{ONNX_FORMAT}' metadata); export it from its checkpoint.")
    return {k: json.loads(v) for k, v in raw.items() if k in _META_KEYS}


class OnnxModel(nn.Module):
    """An ONNX Runtime session behind the ``nn.Module`` interface: tensors in, logits out.

    Lets :class:`~breast_cancer_detection.inference.Predictor` and
    :func:`~breast_cancer_detection.engine.evaluate` run an exported model unchanged.
    There are no gradients, so Grad-CAM needs the PyTorch checkpoint.

    Args:
        path_or_session: An ``.onnx`` file or an ``onnxruntime.InferenceSession``.
        device: ``cuda`` or ``auto`` use ONNX Runtime's CUDA provider when it is installed
            (onnxruntime-gpu), else the CPU.
        threads: Threads one run uses on a CPU (None: ONNX Runtime's default, one a core).
            With 1, a run works in the calling thread alone, so several threads can score
            batches side by side on one session.
    """

    def __init__(self, path_or_session, *, device: str = "cpu", threads: int | None = None):
        super().__init__()
        ort = import_optional("onnxruntime")
        if isinstance(path_or_session, (str, Path)):
            path = Path(path_or_session)
            if not path.is_file():
                raise UserError(f"{path}: no such ONNX model. Write one with "
                                "`bcd export CKPT --onnx PATH`.")
            providers = ["CPUExecutionProvider"]
            if str(device) == "auto" or str(device).startswith("cuda"):
                providers.insert(0, "CUDAExecutionProvider")
            available = ort.get_available_providers()
            options = ort.SessionOptions()
            # Threads that spin between runs take the cores from whatever works beside the
            # model (the reading thread of `bcd slide`, DataLoader workers, a PyTorch model in
            # the same process): 10-20% fewer tiles/s in `bcd slide` with spinning on.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if threads is not None:
                options.intra_op_num_threads = max(1, int(threads))
            try:
                self.session = ort.InferenceSession(
                    str(path), options, providers=[p for p in providers if p in available])
            except Exception as e:  # noqa: BLE001 - onnxruntime wraps everything in its own
                raise UserError(f"{path}: ONNX Runtime cannot load it ({type(e).__name__}: "
                                f"{e}).") from e
        else:
            self.session = path_or_session
        self.path = Path(path_or_session) if isinstance(path_or_session, (str, Path)) else None
        self.device = device
        self.input_name = self.session.get_inputs()[0].name

    @property
    def metadata(self) -> dict[str, Any]:
        """See :func:`read_onnx_metadata`."""
        return read_onnx_metadata(self.session)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = x.detach().to("cpu", torch.float32).contiguous().numpy()
        logits = self.session.run(None, {self.input_name: feed})[0]
        return torch.from_numpy(logits).to(x.device)

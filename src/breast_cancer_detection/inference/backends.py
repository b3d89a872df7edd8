"""Where a model runs: one small wrapper per backend (PyTorch: :func:`torch_model`; ONNX
Runtime: :func:`onnx_model`, :func:`onnx_file`, :func:`float32_onnx`; the int8 ONNX model:
:func:`int8_onnx`), and the one rule that picks among them, :func:`select_backend`, which
:data:`BACKEND_HELP` states in words."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..checkpoint import Checkpoint, resolve_device
from ..config import check_backend
from ..errors import UserError
from ..hub import cache_root

if TYPE_CHECKING:
    from ..export import OnnxModel



# ----------------------------------------------------------------------------- one backend each


def torch_model(model: torch.nn.Module, device: str | torch.device,
                channels_last: bool) -> tuple[torch.nn.Module, torch.device]:
    """PyTorch: the network in eval mode on ``device`` (``auto`` resolved), its convolutions
    in channels-last layout when ``channels_last``; and that device."""
    device = resolve_device(device) if isinstance(device, str) else device
    model = model.to(device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, device


def onnx_model(model, device: str | torch.device) -> OnnxModel:
    """ONNX Runtime: an ONNX file or ONNX Runtime session (or an :class:`OnnxModel` as it is)
    behind the ``nn.Module`` interface, on ``device`` where ONNX Runtime runs it."""
    from ..export import OnnxModel

    if not isinstance(model, OnnxModel):
        model = OnnxModel(model, device=str(device))
    return model.to(torch.device("cpu")).eval()  # ONNX Runtime moves data itself


def onnx_file(local: Path, path: str | Path, device: str) -> OnnxModel:
    """ONNX Runtime on a file of ours (``local``, named ``path`` in messages), refusing an
    int8 model that does not pass today's accuracy gate."""
    from ..export import OnnxModel
    from ..int8 import gate_holds

    model = OnnxModel(local, device=device)
    meta = model.metadata
    if meta.get("int8") is not None and not gate_holds(meta["int8"]):
        raise UserError(f"{path}: an int8 model that did not pass today's accuracy gate "
                        "(or whose gate figures are missing); use the float32 export, or "
                        "export it again with `bcd export --int8`.")
    return model


def float32_onnx(checkpoint: Checkpoint, cache_dir: str | Path | None) -> OnnxModel:
    """ONNX Runtime on the checkpoint's float32 export, made once into the cache.

    Raises:
        UserError: the export failed, or onnx or onnxruntime is not installed.
    """
    from ..export import OnnxModel, cached_onnx

    return OnnxModel(cached_onnx(checkpoint, cache_root(cache_dir)))


def int8_onnx(checkpoint: Checkpoint, cache_dir: str | Path | None, *,
              stacklevel: int = 2) -> OnnxModel | None:
    """The int8 model of these weights that passed its accuracy gate: the one ``bcd export
    --int8`` left in the cache, or the one the checkpoint carries (``--embed``), unpacked
    there; None without one, with a warning when one is there but cannot serve (``stacklevel``
    as for :func:`warnings.warn` called here)."""
    from ..export import cached_onnx_path
    from ..int8 import cached_int8, unpack_int8

    int8 = cached_onnx_path(checkpoint, cache_root(cache_dir), int8=True)
    embedded = checkpoint.int8_onnx
    if not int8.is_file() and embedded:
        unpack_int8(checkpoint, int8)
    model, why = cached_int8(int8)
    # A damaged or outdated copy in the cache: the checkpoint's own model replaces it.
    if model is None and why and embedded and unpack_int8(checkpoint, int8):
        model, why = cached_int8(int8)
    if why:
        warnings.warn(f"{int8} {why}; running float32.", stacklevel=stacklevel)
    return model


# ----------------------------------------------------------------------------- the choice


def select_backend(backend: str, *, current: str, model, device: torch.device,
                   checkpoint: Checkpoint | None, cache_dir: str | Path | None = None,
                   stacklevel: int = 2) -> OnnxModel | None:
    """The ONNX Runtime model that ``backend`` asks for, or None to keep the model as it is.

    ``torch`` keeps a PyTorch model. ``onnx`` runs the int8 model when one for these weights
    passed its accuracy gate (:func:`int8_onnx`), else the float32 export
    (:func:`float32_onnx`); ``float32`` is ``onnx`` without the int8 model. ``auto`` is
    :data:`BACKEND_HELP`: ``onnx`` on a CPU when onnxruntime is installed and the model came
    from a checkpoint, the model as it is otherwise and when the export fails (with a
    warning). A model already on ONNX Runtime stays as it is.

    Args:
        backend: ``auto``, ``torch``, ``onnx`` or ``float32``.
        current: The backend the model runs on now, ``torch`` or ``onnx``.
        model: That model (its ONNX metadata says whether it is int8).
        device: Where a PyTorch model runs.
        checkpoint: The checkpoint the model came from, or None.
        cache_dir: Where exports are kept (``onnx/`` under it; default ``$BCD_CACHE`` or
            ``~/.cache/breast_cancer_detection``).
        stacklevel: Whose line warnings name, as for :func:`warnings.warn` called here.

    Raises:
        UserError: an unknown backend, or one asked for and not possible (PyTorch or float32
            for an ONNX file, no onnxruntime, no checkpoint).
    """
    check_backend(backend)
    if backend == "float32" and current == "onnx" and model.metadata.get("int8"):
        raise UserError("this model is an int8 ONNX file: float32 needs the checkpoint (or "
                        "its float32 export, `bcd export CKPT --onnx PATH`).")
    if backend == "torch" or current == "onnx" or (
            backend == "auto" and (device.type != "cpu" or checkpoint is None
                                   or importlib.util.find_spec("onnxruntime") is None)):
        if backend == "torch" and current != "torch":
            raise UserError("this model is an ONNX file: PyTorch needs its checkpoint.")
        return None
    if checkpoint is None:
        raise UserError("backend onnx needs the model's checkpoint to export it.")
    chosen = None
    if backend != "float32":
        chosen = int8_onnx(checkpoint, cache_dir, stacklevel=stacklevel + 1)
    try:
        if chosen is None:
            chosen = float32_onnx(checkpoint, cache_dir)
    except UserError as e:
        if backend != "auto":
            raise
        warnings.warn(f"ONNX export failed, PyTorch runs instead: {e}",
                      stacklevel=stacklevel)
        return None
    return chosen

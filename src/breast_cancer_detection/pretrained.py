"""Named trained models: a registry of ready-to-use checkpoints, and where to find each file.

The bundled registry (``pretrained.yaml`` beside this module) lists the model shipped in the
repository; YAML files named by the environment variable ``BCD_MODELS`` add a user's own
(same schema), so a model is added without changing code. A name resolves to a local file:
a file in the repository is checked against its SHA-256, a URL is downloaded once into the
cache through :func:`bcd.fetch_checkpoint` and checked the same way.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import UserError

ENV = "BCD_MODELS"
"""Environment variable: extra registry files, separated by ``os.pathsep``."""

BUNDLED_REGISTRY = Path(__file__).with_name("pretrained.yaml")
"""The registry shipped with the package (tests point it elsewhere)."""

REPO_ROOT = Path(__file__).resolve().parents[2]
"""What the bundled registry's ``file`` paths are relative to: src/breast_cancer_detection
is two levels below the repository root."""

SAMPLE_PATCHES = Path(__file__).with_name("samples") / "pcam"
"""Six 96 px PatchCamelyon patches shipped with the package (CC0): ``normal/`` and ``tumor/``,
three each, for the bundled patch model (``bcd predict --samples``)."""

SAMPLES_MODEL = "pcam-patch-cnn"
"""The trained model the sample patches are for."""

_LFS_POINTER = b"version https://git-lfs"


class TrainedModelError(UserError, LookupError):
    """An unknown model name, a malformed registry file, or a model file that is missing or
    not the one the registry names."""


@dataclass(frozen=True)
class TrainedModel:
    """One registry entry.

    Attributes:
        name: What users type (``bcd predict --model NAME``).
        task: What the model tells apart, on what tissue.
        mpp: Micrometres per pixel of its training images, when known.
        input_size: Side in pixels of its square training input, when known.
        file: A local ``.pt``/``.onnx`` path as written in the registry, or None.
        url: An ``http(s)://`` address of the file, or None.
        sha256: The file's SHA-256 hex digest; None only for a local file (then unchecked).
        intended_use: One line: what it is for.
        not_for: One line: what it must not be used for.
        default: Whether this is the model ``bcd predict`` and ``bcd serve`` use on images
            when none is named.
        slide_default: Whether this is the model ``bcd slide`` uses when none is named.
        registry: The YAML file the entry comes from.
        base: The folder a relative ``file`` is relative to.
    """

    name: str
    task: str
    mpp: float | None = None
    input_size: int | None = None
    file: str | None = None
    url: str | None = None
    sha256: str | None = None
    intended_use: str = ""
    not_for: str = ""
    default: bool = False
    slide_default: bool = False
    registry: Path = BUNDLED_REGISTRY
    base: Path = REPO_ROOT

    def __post_init__(self) -> None:
        where = f"{self.registry}, model {self.name!r}"
        if not self.file and not self.url:
            raise TrainedModelError(f"{where}: give a `file` (local path) or a `url`.")
        if self.url and not self.url.startswith(("https://", "http://")):
            raise TrainedModelError(f"{where}: url {self.url!r} must start with https://.")
        if self.url and not self.sha256:
            # A download without a hash could be swapped on the way or on the server.
            raise TrainedModelError(
                f"{where}: a `url` needs a `sha256` so that the download can be checked; add "
                "`sha256: HEX` (the output of `sha256sum FILE`) to the entry.")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise TrainedModelError(f"{where}: sha256 {self.sha256!r} is not a SHA-256 hex "
                                    "digest (64 hex digits, as `sha256sum FILE` prints).")

    @property
    def path(self) -> Path | None:
        """The local file the entry names (absolute), or None for a URL-only entry."""
        if not self.file:
            return None
        p = Path(self.file).expanduser()
        return p if p.is_absolute() else self.base / p

    @property
    def present(self) -> bool:
        """Whether the model is on this machine: its local file, or for a URL entry its
        downloaded copy in the cache."""
        if self.path is not None and self.path.is_file():
            return True
        if self.url:
            from .hub import cache_name, cache_root

            return (cache_root() / "checkpoints" / cache_name(self.url)).is_file()
        return False

    @property
    def bundled(self) -> bool:
        """Whether the entry comes from the registry shipped with the package."""
        return self.registry == BUNDLED_REGISTRY

    @property
    def where(self) -> str:
        """The file as written in the registry, else the URL."""
        return self.file or self.url or ""

    @property
    def scale(self) -> str:
        """``0.972 um/px, 96 px`` (the parts that are known)."""
        parts = ([f"{self.mpp:g} um/px"] if self.mpp else []) + (
            [f"{self.input_size} px"] if self.input_size else [])
        return ", ".join(parts) or "unknown"

    def card(self) -> dict[str, Any]:
        """The entry as plain values for a model card (no local paths)."""
        return {"name": self.name, "task": self.task, "mpp": self.mpp,
                "input_size": self.input_size, "source": self.url or self.file,
                "sha256": self.sha256, "intended_use": self.intended_use,
                "not_for": self.not_for}


# ----------------------------------------------------------------------------- the registry


def registry_files() -> list[Path]:
    """The bundled registry, then each file named in ``$BCD_MODELS``, in that order."""
    extra = [Path(p).expanduser() for p in os.environ.get(ENV, "").split(os.pathsep) if p]
    return [BUNDLED_REGISTRY, *extra]


def _read_registry(path: Path) -> list[TrainedModel]:
    import yaml

    if not path.is_file():
        raise TrainedModelError(f"{path}: no such model registry file (named by ${ENV}); fix "
                                f"or remove that entry of {ENV}.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise TrainedModelError(f"{path}: not valid YAML ({e}).") from e
    items = data.get("models") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise TrainedModelError(f"{path}: expected a top-level `models:` list of entries "
                                "(see the bundled pretrained.yaml for the schema).")
    known = {f.name for f in fields(TrainedModel)} - {"registry", "base"}
    base = REPO_ROOT if path == BUNDLED_REGISTRY else path.resolve().parent
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not item.get("name") or not item.get("task"):
            raise TrainedModelError(f"{path}: entry {i + 1} needs at least `name` and `task`.")
        unknown = sorted(set(item) - known)
        if unknown:
            raise TrainedModelError(f"{path}, model {item['name']!r}: unknown field(s) "
                                    f"{', '.join(unknown)}; the fields are "
                                    f"{', '.join(sorted(known))}.")
        values = dict(item)
        if values.get("sha256"):
            values["sha256"] = str(values["sha256"]).strip().lower()
        try:
            values["mpp"] = None if values.get("mpp") is None else float(values["mpp"])
            values["input_size"] = (None if values.get("input_size") is None
                                    else int(values["input_size"]))
        except (TypeError, ValueError) as e:
            raise TrainedModelError(f"{path}, model {item['name']!r}: mpp and input_size must "
                                    f"be numbers ({e}).") from e
        values["default"] = bool(values.get("default", False))
        values["slide_default"] = bool(values.get("slide_default", False))
        for key in ("name", "task", "file", "url", "intended_use", "not_for"):
            if values.get(key) is not None:
                values[key] = str(values[key]).strip()
        out.append(TrainedModel(**values, registry=path, base=base))
    for key in ("default", "slide_default"):
        defaults = [m.name for m in out if getattr(m, key)]
        if len(defaults) > 1:
            raise TrainedModelError(f"{path}: {', '.join(defaults)} are all marked `{key}: "
                                    "true`; keep it on one.")
    return out


def is_registered_file(path: str | Path) -> bool:
    """Whether ``path`` is the local file of a registry entry (which must never be rewritten:
    its SHA-256 is checked before every use)."""
    target = Path(path).resolve()
    try:
        entries = list_trained()
    except TrainedModelError:
        return False
    return any(e.path is not None and e.path.resolve() == target for e in entries)


def list_trained() -> list[TrainedModel]:
    """Every registered trained model: the bundled ones, then those of ``$BCD_MODELS``.

    Raises:
        TrainedModelError: a registry file is missing or malformed, or two entries share a
            name.
    """
    seen: dict[str, TrainedModel] = {}
    for path in registry_files():
        for m in _read_registry(path):
            if m.name in seen:
                raise TrainedModelError(
                    f"model name {m.name!r} is in both {seen[m.name].registry} and "
                    f"{m.registry}; rename one of them.")
            seen[m.name] = m
    return list(seen.values())


def trained_model(name: str | None = None, *, slides: bool = False) -> TrainedModel:
    """The registry entry called ``name``; None gives the default one.

    The default is the entry marked ``default: true`` (images: ``bcd predict``, ``bcd
    serve``), or ``slide_default: true`` when ``slides`` (``bcd slide``), in the last registry
    file that marks one, so a ``$BCD_MODELS`` file can choose another default than the
    bundled one. Without a ``slide_default``, slides fall back to the image default.

    Raises:
        TrainedModelError: no such name (the message lists the known ones), or no default.
    """
    models = list_trained()
    if name is None:
        defaults = [m for m in models if m.default]
        if slides:
            defaults = [m for m in models if m.slide_default] or defaults
        if not defaults:
            raise TrainedModelError(
                "no trained model is marked `default: true` in "
                f"{', '.join(map(str, registry_files()))}; name one (--model NAME) or mark one "
                "as default.")
        return defaults[-1]
    for m in models:
        if m.name == name:
            return m
    known = ", ".join(m.name for m in models) or "none"
    raise TrainedModelError(f"no trained model called {name!r}; the known ones are: {known} "
                            f"(`bcd models --trained`; add your own with a YAML file in ${ENV}).")


def is_trained_name(name: str) -> bool:
    """Whether ``name`` is a registered model (a malformed registry counts as no)."""
    try:
        return any(m.name == name for m in list_trained())
    except TrainedModelError:
        return False


def resolve_trained(name: str | None = None, *, cache: str | Path | None = None,
                    progress: bool = True) -> Path:
    """The local file of a registered model, checked against its SHA-256 before use.

    A local file is used where it is (a null ``sha256`` skips the check); a URL entry whose
    file is not local is downloaded once into the cache (see :func:`bcd.fetch_checkpoint`).

    Args:
        name: A registry name; None for the default model.
        cache: Download cache folder (default ``$BCD_CACHE`` or
            ``~/.cache/breast_cancer_detection``).
        progress: Show a download progress bar.

    Raises:
        TrainedModelError: unknown name; the file is missing and there is no URL; the file
            is a Git LFS pointer; the file's SHA-256 differs from the registry's.
        CheckpointError: the download failed or did not match its hash.
    """
    from .data.download import sha256_of
    from .hub import fetch_checkpoint

    entry = trained_model(name)
    local = entry.path
    if local is not None and local.is_file():
        with open(local, "rb") as f:
            if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
                raise TrainedModelError(
                    f"{local} is a Git LFS pointer, not the model: run `git lfs install && "
                    "git lfs pull` in the clone to fetch the file.")
        if entry.sha256 is not None:
            actual = sha256_of(local)
            if actual != entry.sha256:
                raise TrainedModelError(
                    f"{local}: SHA-256 mismatch for trained model {entry.name!r} (the registry "
                    f"{entry.registry} expects {entry.sha256}, the file has {actual}); it is "
                    "not the file the registry names: restore it (git checkout -- "
                    f"{entry.file}) or update the registry's sha256.")
        return local
    if entry.url:
        return fetch_checkpoint(entry.url, sha256=entry.sha256, cache=cache, progress=progress)
    if entry.bundled:
        raise TrainedModelError(
            f"trained model {entry.name!r}: {local} is not in this copy of the repository "
            "(a clone from before the model was added, a shallow or partial checkout, or an "
            "install without the repository's checkpoints/ folder). Get it with `git pull` "
            "(and `git lfs pull` if the clone uses Git LFS), or make a fresh `git clone` of "
            "the repository; or pass your own checkpoint instead.")
    raise TrainedModelError(f"trained model {entry.name!r}: {local} (from {entry.registry}) "
                            "does not exist; fix `file` in that registry or add a `url`.")

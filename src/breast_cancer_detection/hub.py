"""Where trained models come from: the download cache, checkpoint URLs and local files.

``fetch_checkpoint(url)`` downloads once into ``$BCD_CACHE`` (default
``~/.cache/breast_cancer_detection``) and checks the SHA-256; ``local_file`` gives a local path
for a path or URL. The cache root and file names are shared with the int8 and ONNX caches.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from pathlib import Path

from .checkpoint import CheckpointError
from .data.download import (
    DEFAULT_DEADLINE_S,
    DEFAULT_MAX_BYTES,
    DownloadError,
    fetch_url,
    is_google_drive_url,
    sha256_of,
)


def cache_root(path: str | Path | None = None) -> Path:
    """Where downloads are kept: ``path``, else ``$BCD_CACHE``, else
    ``~/.cache/breast_cancer_detection``."""
    if path is not None:
        return Path(path)
    env = os.environ.get("BCD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "breast_cancer_detection"


def is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def expected_sha256(url: str, sha256: str | None) -> tuple[str, str | None]:
    """The URL without its fragment, and the hash to check (argument or ``#sha256=``)."""
    bare, fragment = urllib.parse.urldefrag(url)
    in_url = urllib.parse.parse_qs(fragment).get("sha256", [None])[0]
    given = [hex_digest(h) for h in (sha256, in_url) if h]
    if len(set(given)) > 1:
        raise CheckpointError(f"two different hashes for {bare}: --sha256 {given[0]} and "
                              f"#sha256={given[1]} in the URL; keep the right one.")
    return bare, given[0] if given else None


def hex_digest(h: str) -> str:
    h = h.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", h):
        raise CheckpointError(f"{h!r} is not a SHA-256 hex digest (64 hex digits).")
    return h


def cache_name(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    key = hashlib.sha256(url.encode()).hexdigest()[:12]
    if is_google_drive_url(url):
        m = re.search(r"/d/([\w-]+)", parsed.path)
        file_id = m[1] if m else urllib.parse.parse_qs(parsed.query).get("id", ["file"])[0]
        return f"{key}-gdrive-{file_id}.pt"
    base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(urllib.parse.unquote(parsed.path)).name)
    return f"{key}-{base or 'checkpoint.pt'}"


def fetch_checkpoint(url: str, *, sha256: str | None = None, cache: str | Path | None = None,
                     progress: bool = True, timeout: float = 30.0,
                     max_bytes: int | None = DEFAULT_MAX_BYTES,
                     deadline: float | None = DEFAULT_DEADLINE_S) -> Path:
    """Downloads a checkpoint once into the cache and returns its local path.

    The download goes through :func:`~breast_cancer_detection.data.download.fetch_url`: raw
    bytes, a temporary name unique to the process and thread, renamed once complete and
    verified, so an interrupted download never leaves a file that looks usable. A cached copy
    is reused without a request; one that fails the hash check is fetched again. A plain
    ``http://`` URL needs a hash, since anyone on the way could swap the file.

    Args:
        url: An ``https://`` URL, an ``http://`` one with a hash, or a Google Drive link
            (fetched with gdown). A ``#sha256=HEX`` fragment gives the expected hash.
        sha256: Expected SHA-256 hex digest; checked before the file is used.
        cache: Cache folder; default ``$BCD_CACHE``, else ``~/.cache/breast_cancer_detection``.
        progress: Show a progress bar.
        timeout: Seconds to wait for the server to connect or send the next bytes.
        max_bytes: Size cap (2 GiB by default); None lifts it.
        deadline: Seconds the whole download may take (an hour by default); None for no limit.

    Raises:
        CheckpointError: the URL is plain http without a hash, the download failed, or the
            file does not match the hash (it is then deleted).
    """
    bare, expected = expected_sha256(url, sha256)
    if urllib.parse.urlparse(bare).scheme.lower() == "http" and expected is None:
        raise CheckpointError(
            f"{bare} is plain http and no SHA-256 was given, so a file changed on the way "
            f"could not be detected. Use the https:// address, or add the expected hash: "
            f"{bare}#sha256=HEX (or --sha256 HEX)."
        )
    folder = cache_root(cache) / "checkpoints"
    target = folder / cache_name(bare)
    if target.is_file():
        if expected is None or sha256_of(target) == expected:
            return target
        target.unlink(missing_ok=True)  # a stale or damaged copy: fetch it again
    try:
        return fetch_url(bare, target, sha256=expected, max_bytes=max_bytes, timeout=timeout,
                         deadline=deadline, resume=False, progress=progress)
    except DownloadError as e:
        raise CheckpointError(str(e)) from None


def local_file(path: str | Path, *, sha256: str | None, cache: str | Path | None,
                progress: bool) -> Path:
    """A local path for ``path``: downloaded when it is a URL, hash-checked when asked."""
    if is_url(str(path)):
        return fetch_checkpoint(str(path), sha256=sha256, cache=cache, progress=progress)
    local = Path(path)
    if sha256 is not None and local.is_file():
        expected = hex_digest(sha256)
        actual = sha256_of(local)
        if actual != expected:
            raise CheckpointError(f"{local}: SHA-256 mismatch (expected {expected}, got "
                                  f"{actual}); the file is not the one you meant to load.")
    return local

"""Download, verify and safely extract the BreakHis v1 histopathology dataset."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import zlib
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import requests

BREAKHIS_URL = "http://www.inf.ufpr.br/vri/databases/BreaKHis_v1.tar.gz"
# Google Drive mirror, tried when the UFPR server cannot be reached. We ship no file id: none
# has been verified against an official copy, and a wrong one would fetch the wrong bytes.
# Set BCD_BREAKHIS_GDRIVE_ID, or pass --source gdrive:ID, with a mirror you trust.
BREAKHIS_GDRIVE_ID: str | None = os.environ.get("BCD_BREAKHIS_GDRIVE_ID") or None
# Unset until verified against an official copy; None turns the check off.
BREAKHIS_SIZE: int | None = None
BREAKHIS_SHA256: str | None = None
BREAKHIS_PAGE = (
    "https://web.inf.ufpr.br/vri/databases/breast-cancer-histopathological-database-breakhis/"
)

_DIRNAME = "BreaKHis_v1"
_ARCHIVE_NAME = f"{_DIRNAME}.tar.gz"
_MARKER = ".complete"
_SLIDES_DIRNAME = "histology_slides"
_CHUNK_SIZE = 1 << 20
_MAX_RETRIES = 3
_RETRY_DELAY_S = 2.0

logger = logging.getLogger(__name__)


class DownloadError(UserError, RuntimeError):
    """The dataset could not be downloaded or extracted; the message says what to do next."""


class _SourceFailed(Exception):
    """One download source failed; the message is a short reason for the combined error."""


class _RetryableError(Exception):
    """A transfer broke after the server answered, so resuming it may succeed."""


def download_breakhis(
    dest: str | Path = "data",
    source: str = "auto",
    *,
    sha256: str | None = BREAKHIS_SHA256,
    size: int | None = BREAKHIS_SIZE,
    progress: bool = True,
    timeout: float = 30.0,
    keep_archive: bool = True,
) -> Path:
    """Downloads and extracts BreakHis v1 unless it is already present.

    Nothing is fetched when ``dest/BreaKHis_v1`` holds a finished extraction (our
    ``.complete`` marker, or a hand-extracted ``histology_slides`` tree with PNGs), and
    a hand-placed ``dest/BreaKHis_v1.tar.gz`` is extracted without downloading. HTTP
    downloads stream into ``dest/BreaKHis_v1.tar.gz.part`` and resume from it, both
    within a call (up to 3 retries after a broken connection) and across calls.
    Extraction goes through a temporary folder, so ``dest/BreaKHis_v1`` only ever
    appears complete.

    Args:
        dest: Folder that receives the archive and the extracted ``BreaKHis_v1`` tree.
        source: ``"auto"`` (UFPR, then the Google Drive mirror), ``"ufpr"``,
            ``"gdrive"``, or an explicit ``http(s)://`` URL of the tarball.
        sha256: Expected SHA-256 hex digest of the archive; ``None`` skips the check.
        size: Expected archive size in bytes; ``None`` skips the check.
        progress: Show a progress bar and status messages (logged instead when False).
        timeout: Seconds to wait for the server to connect or send data.
        keep_archive: Keep ``dest/BreaKHis_v1.tar.gz`` after a successful extraction
            (it is then no longer needed and may be deleted by hand); False deletes it.

    Returns:
        The extracted dataset root, ``dest/BreaKHis_v1``.

    Raises:
        DownloadError: If every source failed, a check failed or extraction failed.
        ValueError: If ``source`` is not one of the accepted values.
    """
    sources = _resolve_sources(source)
    dest = Path(dest)
    root = dest / _DIRNAME
    archive = dest / _ARCHIVE_NAME

    if _is_present(root):
        _say(f"BreakHis is already present at {root}; nothing to download.", progress)
        return root
    _clear_unusable_root(root)
    dest.mkdir(parents=True, exist_ok=True)

    if archive.is_file():
        _say(f"Found {archive}; extracting it instead of downloading.", progress)
        try:
            _verify(archive, sha256=sha256, size=size, remove=False)
        except _SourceFailed as exc:
            raise DownloadError(
                f"{archive} failed verification ({exc}). Replace it with a good copy of "
                f"{_ARCHIVE_NAME} from {BREAKHIS_PAGE} , or delete it and run again to "
                "download it."
            ) from None
    else:
        _download(sources, dest, sha256=sha256, size=size, progress=progress, timeout=timeout)

    _extract(archive, root, progress=progress)
    if keep_archive:
        _say(
            f"BreakHis extracted to {root}. The archive {archive} is no longer needed "
            "and can be deleted.",
            progress,
        )
    else:
        archive.unlink(missing_ok=True)
        _say(f"BreakHis extracted to {root}; deleted {archive}.", progress)
    return root


def _say(message: str, progress: bool) -> None:
    # Status lines belong on the console in interactive use, but quiet runs
    # (progress=False) should still leave a trace for whoever configured logging.
    if progress:
        print(message, flush=True)
    else:
        logger.info(message)


def _resolve_sources(source: str) -> list[tuple[str, str]]:
    # Module globals are read at call time so that a patched URL or mirror id is honoured.
    if source == "auto":
        return [("ufpr", BREAKHIS_URL), ("gdrive", BREAKHIS_GDRIVE_ID or "")]
    if source == "ufpr":
        return [("ufpr", BREAKHIS_URL)]
    if source == "gdrive":
        return [("gdrive", BREAKHIS_GDRIVE_ID or "")]
    if source.startswith("gdrive:"):
        return [("gdrive", source.removeprefix("gdrive:"))]
    if source.startswith(("http://", "https://")):
        return [(source, source)]
    raise ValueError(
        f"Unknown BreakHis source {source!r}; use 'auto', 'ufpr', 'gdrive', 'gdrive:FILE_ID' "
        "or an http(s) URL."
    )


def _has_slides(folder: Path) -> bool:
    for slides in folder.glob(f"**/{_SLIDES_DIRNAME}"):
        if slides.is_dir() and next(slides.rglob("*.png"), None) is not None:
            return True
    return False


def _is_present(root: Path) -> bool:
    if not root.is_dir():
        return False
    # The marker is only written after a verified extraction, so trusting it keeps
    # repeated calls cheap; otherwise accept a tree the user extracted by hand.
    return (root / _MARKER).is_file() or _has_slides(root)


def _clear_unusable_root(root: Path) -> None:
    if not root.exists() and not root.is_symlink():
        return
    if root.is_dir() and not root.is_symlink() and next(root.iterdir(), None) is None:
        # An empty folder carries no user data and would only block the final rename.
        root.rmdir()
        return
    raise DownloadError(
        f"{root} exists but does not contain the BreakHis {_SLIDES_DIRNAME} tree with PNG "
        "images. Move or delete it and run again, or pass --data PATH to a complete copy."
    )


def _download(
    sources: list[tuple[str, str]],
    dest: Path,
    *,
    sha256: str | None,
    size: int | None,
    progress: bool,
    timeout: float,
) -> None:
    archive = dest / _ARCHIVE_NAME
    part = dest / f"{_ARCHIVE_NAME}.part"
    # gdown keeps its own resumable temp files and skips the download when its output
    # already exists, so it must not be pointed at a partial HTTP download.
    gdrive_out = dest / f"{_ARCHIVE_NAME}.gdrive"
    reasons: list[str] = []
    for index, (label, target) in enumerate(sources):
        try:
            if label == "gdrive":
                _download_gdrive(target, gdrive_out, progress=progress)
                fetched = gdrive_out
            else:
                _download_http(target, part, size=size, progress=progress, timeout=timeout)
                fetched = part
            _verify(fetched, sha256=sha256, size=size, remove=True)
        except _SourceFailed as exc:
            reasons.append(f"{label}: {exc}")
            if index + 1 < len(sources):
                _say(f"Download from {label} failed ({exc}); trying the next source.", progress)
            continue
        os.replace(fetched, archive)
        # A partial HTTP download is useless once another source delivered the archive.
        part.unlink(missing_ok=True)
        return
    raise DownloadError(
        f"Could not download BreakHis ({'; '.join(reasons)}). Download {_ARCHIVE_NAME} by "
        f"hand from {BREAKHIS_PAGE} , put it at {archive} (or extract it under {dest}/) "
        "and run again, or pass --data PATH to an extracted copy."
    )


def _download_gdrive(file_id: str, output: Path, *, progress: bool) -> None:
    if not file_id:
        raise _SourceFailed("no Google Drive mirror id is set (BCD_BREAKHIS_GDRIVE_ID, or "
                            "--source gdrive:FILE_ID)")
    try:
        import gdown
    except ImportError:
        raise _SourceFailed("gdown is not installed, run `pip install gdown`") from None
    try:
        result = gdown.download(id=file_id, output=str(output), quiet=not progress, resume=True)
    except Exception as exc:  # gdown surfaces network, quota and parsing errors alike
        raise _SourceFailed(_describe(exc)) from exc
    # Older gdown versions report failures by returning None instead of raising.
    if result is None or not output.is_file():
        raise _SourceFailed("gdown did not produce a file (quota exceeded or link gone?)")


def _download_http(
    url: str, part: Path, *, size: int | None, progress: bool, timeout: float
) -> None:
    import requests

    failures = 0
    with requests.Session() as session:
        while True:
            try:
                _fetch_once(session, url, part, size=size, progress=progress, timeout=timeout)
                return
            except _RetryableError as exc:
                reason = str(exc)
            except (requests.ConnectionError, requests.Timeout) as exc:
                # An unreachable server (offline, DNS failure) will not recover within
                # seconds, so only a transfer that had already started is retried.
                if failures == 0:
                    raise _SourceFailed(_describe(exc, timeout)) from exc
                reason = _describe(exc, timeout)
            except requests.RequestException as exc:
                raise _SourceFailed(_describe(exc, timeout)) from exc
            except OSError as exc:
                # Not the network: another source would hit the same local problem.
                raise DownloadError(
                    f"Writing {part} failed ({exc}). Fix the cause (free disk space?) and run "
                    "again; the download resumes from the partial file."
                ) from exc
            failures += 1
            if failures > _MAX_RETRIES:
                raise _SourceFailed(
                    f"connection lost {failures} times ({reason}); the partial download is "
                    f"kept at {part} and running again resumes it"
                )
            logger.warning(
                "BreakHis download interrupted (%s); resuming (retry %d of %d)",
                reason,
                failures,
                _MAX_RETRIES,
            )
            time.sleep(_RETRY_DELAY_S * failures)


def _fetch_once(
    session: requests.Session,
    url: str,
    part: Path,
    *,
    size: int | None,
    progress: bool,
    timeout: float,
) -> None:
    """Fetches the rest of ``url`` into ``part`` and returns once it holds the whole file.

    Raises:
        _RetryableError: If the transfer broke after the server had answered.
        _SourceFailed: If the server answered with something that is not the archive.
    """
    from tqdm import tqdm

    offset = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with session.get(url, headers=headers, stream=True, timeout=timeout) as resp:
        if resp.status_code == 416 and offset:
            total = _content_range(resp.headers.get("Content-Range", ""))[1]
            if total == offset:
                return  # the previous call had already received every byte
            # The partial file is longer than the remote one, so it cannot be resumed.
            part.unlink()
            raise _RetryableError("partial download did not match the remote file")
        if resp.status_code >= 400:
            raise _SourceFailed(f"HTTP {resp.status_code} {resp.reason}")
        if resp.headers.get("Content-Type", "").lower().startswith("text/html"):
            raise _SourceFailed("the server sent an HTML page instead of the archive")

        length = resp.headers.get("Content-Length")
        if resp.status_code == 206:
            start, total = _content_range(resp.headers.get("Content-Range", ""))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _RetryableError(f"server resumed at byte {start} instead of {offset}")
            if total is None and length is not None:
                total = offset + int(length)
        else:
            # The server ignored the Range header and sends the whole file again.
            offset = 0
            total = int(length) if length is not None else None

        if total is not None and size is not None and total != size:
            part.unlink(missing_ok=True)
            raise _SourceFailed(f"the server announces {total} bytes, expected {size}")

        with (
            part.open("ab" if offset else "wb") as f,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=_ARCHIVE_NAME,
                disable=not progress,
            ) as bar,
        ):
            for chunk in _network_chunks(resp):
                f.write(chunk)
                bar.update(len(chunk))

    received = part.stat().st_size
    if total is not None and received < total:
        raise _RetryableError(f"connection closed after {received} of {total} bytes")
    if total is not None and received > total:
        part.unlink()
        raise _SourceFailed(f"received {received} bytes but the server announced {total}")


def _network_chunks(resp: requests.Response) -> Iterator[bytes]:
    import requests
    import urllib3

    try:
        # Raw bytes, because a server that labels the .gz with Content-Encoding: gzip
        # would otherwise have it decompressed on the fly.
        yield from resp.raw.stream(_CHUNK_SIZE, decode_content=False)
    except (
        urllib3.exceptions.HTTPError,
        http.client.HTTPException,
        requests.RequestException,
        ConnectionError,
        TimeoutError,
    ) as exc:
        # Errors from writing the chunks happen in the caller and never pass through
        # here, so everything caught is the network breaking mid-transfer.
        raise _RetryableError(_describe(exc)) from exc


def _content_range(header: str) -> tuple[int | None, int | None]:
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", header)
    if match is None:
        return None, None
    start = int(match[1]) if match[1] is not None else None
    total = int(match[2]) if match[2] != "*" else None
    return start, total


def _describe(exc: BaseException, timeout: float | None = None) -> str:
    import requests

    if isinstance(exc, requests.Timeout) and timeout is not None:
        return f"no answer within {timeout:g} s"
    text = str(exc)
    # requests buries the useful part ("Connection refused", "Name or service not
    # known") deep inside a long urllib3 repr; surface just that.
    errno_match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno_match is not None:
        return errno_match[1].strip().rstrip(".")
    first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first_line if len(first_line) <= 200 else first_line[:197] + "..."


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_CHUNK_SIZE), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, *, sha256: str | None, size: int | None, remove: bool) -> None:
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        if remove:
            path.unlink()
        raise _SourceFailed(
            f"size mismatch (expected {size} bytes, got {actual_size})"
            + ("; the download was deleted, run again to retry" if remove else "")
        )
    if sha256 is None:
        return
    actual = _sha256_of(path)
    if actual.lower() != sha256.strip().lower():
        if remove:
            path.unlink()
        raise _SourceFailed(
            f"sha256 mismatch (expected {sha256}, got {actual})"
            + ("; the download was deleted, run again to retry" if remove else "")
        )


def _extract(archive: Path, root: Path, *, progress: bool) -> None:
    if not tarfile.is_tarfile(archive):
        archive.unlink()
        raise DownloadError(
            f"{archive} is not a tar archive (an HTML error page saved by mistake?) and was "
            f"deleted. Run again to download it, or download {_ARCHIVE_NAME} by hand from "
            f"{BREAKHIS_PAGE} and put it at {archive}."
        )
    _say(f"Extracting {archive} ...", progress)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_DIRNAME}.tmp-", dir=root.parent))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                _safe_extract(tar, tmp)
        except (tarfile.ReadError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            # Checked before OSError: BadGzipFile is one, yet it means a corrupt archive
            # rather than a local problem such as a full disk.
            archive.unlink(missing_ok=True)
            raise DownloadError(
                f"{archive} is corrupt or truncated ({exc}) and was deleted. Run again to "
                "download it again."
            ) from exc
        except (tarfile.TarError, OSError) as exc:
            raise DownloadError(
                f"Extracting {archive} into {root.parent} failed ({exc}). Fix the cause "
                "(free disk space? permissions?) and run again; the archive is kept."
            ) from exc

        top = _dataset_top(tmp)
        if not _has_slides(top):
            raise DownloadError(
                f"{archive} does not contain a {_SLIDES_DIRNAME} folder with PNG images, so "
                f"it is not the BreakHis dataset. Delete it and run again, or download "
                f"{_ARCHIVE_NAME} by hand from {BREAKHIS_PAGE} ."
            )
        (top / _MARKER).write_text(f"extracted from {archive.name}\n", encoding="utf-8")
        os.replace(top, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dataset_top(tmp: Path) -> Path:
    # Hidden entries (e.g. macOS "._BreaKHis_v1" AppleDouble files) do not count as a
    # second top-level folder.
    entries = [p for p in tmp.iterdir() if not p.name.startswith(".")]
    if (tmp / _DIRNAME).is_dir():
        return tmp / _DIRNAME
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return tmp


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    # Member by member keeps it to one pass over the gzip stream; checking each member
    # before it is written keeps everything inside dest.
    use_filter = hasattr(tarfile, "data_filter")
    for member in tar:
        _check_member(member, dest)
        if use_filter:
            # The stdlib "data" filter (3.12+, backported to 3.11.4) also strips unsafe
            # permissions and is kept as a second line of defence.
            tar.extract(member, dest, filter="data")
        else:
            tar.extract(member, dest)


def _is_within(base: str, target: str) -> bool:
    return os.path.commonpath([base, target]) == base


def _check_member(member: tarfile.TarInfo, dest: Path) -> None:
    base = os.path.realpath(dest)
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    problem: str | None = None
    if name.startswith(("/", "\\")) or os.path.isabs(name) or re.match(r"[A-Za-z]:", name):
        problem = "absolute path"
    elif ".." in parts:
        problem = "path with '..'"
    elif not _is_within(base, os.path.realpath(os.path.join(base, name))):
        problem = "path outside the destination"
    elif member.isdev():
        problem = "device file"
    elif member.issym() or member.islnk():
        link = member.linkname
        anchor = os.path.dirname(os.path.join(base, name)) if member.issym() else base
        if os.path.isabs(link) or not _is_within(
            base, os.path.realpath(os.path.join(anchor, link))
        ):
            problem = f"link to {link!r} outside the destination"
    if problem is not None:
        raise DownloadError(
            f"Refusing to extract unsafe tar member {name!r} ({problem}); this is not the "
            f"original BreakHis archive. Delete it and run again, or download "
            f"{_ARCHIVE_NAME} by hand from {BREAKHIS_PAGE} ."
        )

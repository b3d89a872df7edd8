"""The one downloader (``fetch_url``) for every file we fetch, and BreakHis v1 download."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import threading
import time
import urllib.parse
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

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

DEFAULT_MAX_BYTES = 2 << 30
"""Size cap of :func:`fetch_url`: far above any checkpoint, far below a full disk."""
DEFAULT_DEADLINE_S = 3600.0
"""Seconds one :func:`fetch_url` call may take in all: 2 GiB at 0.6 MB/s."""

_DIRNAME = "BreaKHis_v1"
_ARCHIVE_NAME = f"{_DIRNAME}.tar.gz"
_MARKER = ".complete"
_SLIDES_DIRNAME = "histology_slides"
# The archive is about 4 GB; the cap only stops a server that never ends its answer.
_BREAKHIS_MAX_BYTES = 8 << 30
# Generous because a slow academic server is normal here and a rerun resumes the partial file.
_BREAKHIS_DEADLINE_S = 6 * 3600.0
_CHUNK_SIZE = 1 << 20
_MAX_RETRIES = 3
_RETRY_DELAY_S = 2.0
_MAX_REDIRECTS = 10

logger = logging.getLogger(__name__)


class DownloadError(UserError, RuntimeError):
    """A file could not be downloaded or extracted; the message says what to do next."""


class _SourceFailed(Exception):
    """One download source failed; the message is a short reason for the combined error."""


class _RetryableError(Exception):
    """A transfer broke after the server answered, so resuming it may succeed."""


class _UnsafeMember(Exception):
    """A tar member would land outside the destination; the message says which and why."""


# ----------------------------------------------------------------------------- any file


def sha256_of(path: str | Path) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(_CHUNK_SIZE), b""):
            digest.update(block)
    return digest.hexdigest()


def is_google_drive_url(url: str) -> bool:
    """Whether ``url`` is a Google Drive link, which :func:`fetch_url` hands to gdown."""
    return urllib.parse.urlparse(url).netloc.lower().endswith("drive.google.com")


def fetch_url(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    timeout: float = 30.0,
    deadline: float | None = DEFAULT_DEADLINE_S,
    resume: bool = True,
    progress: bool = True,
) -> Path:
    """Downloads ``url`` to ``dest`` and returns ``dest`` once it is complete and verified.

    The bytes are stored exactly as the server sent them: ``Accept-Encoding: identity`` is
    asked for and a ``Content-Encoding`` is never undone, so a hash published for the file
    matches. They go to a temporary file beside ``dest`` that is renamed only after every
    check passed, so ``dest`` never holds a partial or unverified file. A broken transfer is
    resumed (up to 3 retries) with ``If-Range``, so a file that changed on the server in the
    meantime is fetched whole again instead of spliced onto the old bytes. A redirect from
    https to plain http is refused. Google Drive links are fetched with gdown.

    Args:
        url: An ``http(s)://`` URL, or a Google Drive link.
        dest: Where the file ends up; its folder is created.
        sha256: Expected SHA-256 hex digest; None skips the check.
        size: Expected size in bytes; None skips the check.
        max_bytes: Size cap: the download stops, and its partial file is removed, as soon as
            the server announces or sends more. None lifts the cap.
        timeout: Seconds to wait for the server to connect or send the next bytes.
        deadline: Seconds the whole download may take, retries included, however steadily
            the server trickles bytes; None for no limit.
        resume: Keep an unfinished download as ``dest.part`` (its ETag or Last-Modified in
            ``dest.part.json``) for the next call to resume; meant for one downloader at a
            time. False writes to a temporary name unique to this process and thread, deleted
            on failure, so any number of threads and processes may fetch the same file.
        progress: Show a progress bar.

    Returns:
        ``dest``.

    Raises:
        DownloadError: The download failed or the file failed a check; the message names the
            URL, the reason and what to do.
    """
    dest = Path(dest)
    try:
        _fetch(url, dest, sha256=sha256, size=size, max_bytes=max_bytes, timeout=timeout,
               deadline=deadline, resume=resume, progress=progress)
    except _SourceFailed as exc:
        raise DownloadError(
            f"Could not download {url} ({exc}). Check the URL, or download the file by hand "
            "and pass its path instead."
        ) from None
    return dest


@dataclass
class _Partial:
    """The file being written, and the validator proving its bytes are the server's file."""

    path: Path
    url: str
    persist: bool  # True: the validator is kept in a file beside it for a later call
    validator: str | None = None

    @property
    def meta(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    def load(self) -> None:
        if not self.persist:
            return
        try:
            data = json.loads(self.meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        value = data.get("validator") if isinstance(data, dict) else None
        self.validator = value if isinstance(value, str) and value else None

    def set_validator(self, value: str | None) -> None:
        self.validator = value
        if not self.persist:
            return
        if value is None:
            self.meta.unlink(missing_ok=True)
        else:
            self.meta.write_text(json.dumps({"url": self.url, "validator": value}) + "\n",
                                 encoding="utf-8")

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)
        self.validator = None

    def kept(self) -> str:
        """The end of an error message: where the partial file is, when it is kept."""
        if self.persist and self.path.is_file():
            return (f"; the partial download is kept at {self.path} and running again "
                    "resumes it")
        return ""


def _fetch(
    url: str,
    dest: Path,
    *,
    sha256: str | None,
    size: int | None,
    max_bytes: int | None,
    timeout: float,
    deadline: float | None,
    resume: bool,
    progress: bool,
) -> None:
    """:func:`fetch_url` with a short reason (``_SourceFailed``) for the caller to word."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    ends = None if deadline is None else time.monotonic() + deadline
    gdrive = is_google_drive_url(url)
    if resume:
        # gdown keeps its own resumable temp files next to its output, so it must not be
        # pointed at a partial HTTP download.
        path = dest.with_name(dest.name + (".gdrive" if gdrive else ".part"))
    else:
        # Process, thread and a random part: concurrent fetches of one URL never share a file.
        tag = f"{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}"
        path = dest.with_name(f".{dest.name}.{tag}.tmp")
    part = _Partial(path, url, persist=resume)
    part.load()
    try:
        if gdrive:
            _fetch_gdrive(url, part.path, progress=progress, resume=resume)
        else:
            _fetch_http(url, part, size=size, max_bytes=max_bytes, timeout=timeout,
                        deadline=deadline, ends=ends, progress=progress, label=dest.name)
        _check_file(part.path, sha256=sha256, size=size, max_bytes=max_bytes, remove=True)
        # On disk before the rename, so a crash cannot leave an empty file under dest's name.
        with part.path.open("r+b") as f:
            os.fsync(f.fileno())
        os.replace(part.path, dest)
        part.discard()  # only the validator file is left to remove
    except BaseException:
        if not resume:
            part.discard()
        raise


def _check_file(
    path: Path, *, sha256: str | None, size: int | None, max_bytes: int | None, remove: bool
) -> None:
    actual_size = path.stat().st_size
    problem = None
    if max_bytes is not None and actual_size > max_bytes:
        problem = f"{actual_size} bytes is more than the size cap of {_bytes(max_bytes)}"
    elif size is not None and actual_size != size:
        problem = f"size mismatch (expected {size} bytes, got {actual_size})"
    elif sha256 is not None:
        actual = sha256_of(path)
        if actual != sha256.strip().lower():
            problem = f"SHA-256 mismatch (expected {sha256}, got {actual})"
    if problem is None:
        return
    if remove:
        _Partial(path, "", persist=True).discard()
        problem += "; the download was deleted, run again to retry"
    raise _SourceFailed(problem)


def _bytes(n: int) -> str:
    """``n`` as the user would set it, e.g. ``2147483648 bytes (2 GiB), max_bytes``."""
    return f"{n} bytes ({n / (1 << 30):.3g} GiB, the max_bytes setting)"


def _fetch_gdrive(url: str, out: Path, *, progress: bool, resume: bool) -> None:
    parsed = urllib.parse.urlparse(url)
    match = re.search(r"/d/([\w-]+)", parsed.path)
    file_id = match[1] if match else urllib.parse.parse_qs(parsed.query).get("id", [""])[0]
    if not file_id:
        raise _SourceFailed("no file id in the Google Drive link; use its share link, "
                            "https://drive.google.com/file/d/FILE_ID/view")
    try:
        import gdown
    except ImportError:
        raise _SourceFailed("gdown is not installed, run `pip install gdown`") from None
    try:
        # By id: the one call that gdown 4.7 to 6 all accept (newer ones dropped fuzzy=).
        result = gdown.download(id=file_id, output=str(out), quiet=not progress, resume=resume)
    except Exception as exc:  # gdown surfaces network, quota and parsing errors alike
        raise _SourceFailed(_describe(exc)) from exc
    # Older gdown versions report failures by returning None instead of raising.
    if result is None or not out.is_file():
        raise _SourceFailed("gdown did not produce a file (quota exceeded, or the file is not "
                            "shared with 'anyone with the link'?)")


def _fetch_http(
    url: str,
    part: _Partial,
    *,
    size: int | None,
    max_bytes: int | None,
    timeout: float,
    deadline: float | None,
    ends: float | None,
    progress: bool,
    label: str,
) -> None:
    import requests

    failures = 0
    with requests.Session() as session:
        while True:
            try:
                _fetch_once(session, url, part, size=size, max_bytes=max_bytes, timeout=timeout,
                            deadline=deadline, ends=ends, progress=progress, label=label)
                return
            except _RetryableError as exc:
                _raise_if_late(ends, deadline, part)
                reason = str(exc)
            except (requests.ConnectionError, requests.Timeout) as exc:
                # A read cut short by the deadline is reported as the deadline.
                _raise_if_late(ends, deadline, part)
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
                    f"Writing {part.path} failed ({exc}). Fix the cause (free disk space?) and "
                    "run again" + ("; the download resumes from the partial file." if
                                   part.persist else ".")
                ) from exc
            failures += 1
            if failures > _MAX_RETRIES:
                raise _SourceFailed(f"connection lost {failures} times ({reason})" + part.kept())
            logger.warning("Download of %s interrupted (%s); resuming (retry %d of %d)",
                           url, reason, failures, _MAX_RETRIES)
            delay = _RETRY_DELAY_S * failures
            time.sleep(delay if ends is None else min(delay, max(0.0, ends - time.monotonic())))


def _raise_if_late(ends: float | None, deadline: float | None, part: _Partial) -> None:
    if ends is not None and time.monotonic() >= ends:
        raise _SourceFailed(
            f"not finished within the {deadline:g} s deadline for the whole download; pass a "
            "longer deadline if the server is merely slow" + part.kept()
        )


def _remaining(timeout: float, ends: float | None) -> float:
    # Every socket wait ends by the deadline, so a silent server cannot outlast it either.
    return timeout if ends is None else max(0.001, min(timeout, ends - time.monotonic()))


def _validator_of(headers: Mapping[str, str]) -> str | None:
    # If-Range only works with a strong ETag; a weak one (W/...) would never match.
    etag = headers.get("ETag", "").strip()
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified", "").strip() or None


def _open(
    session: requests.Session, url: str, headers: dict[str, str], *, timeout: float,
    ends: float | None,
) -> requests.Response:
    """GET ``url``, following redirects ourselves so that none can leave https."""
    current, secure = url, False
    for _ in range(_MAX_REDIRECTS + 1):
        secure = secure or urllib.parse.urlparse(current).scheme.lower() == "https"
        wait = _remaining(timeout, ends)
        resp = session.get(current, headers=headers, stream=True, timeout=(wait, wait),
                           allow_redirects=False)
        if not resp.is_redirect:
            return resp
        target = urllib.parse.urljoin(current, resp.headers["Location"])
        resp.close()
        if secure and urllib.parse.urlparse(target).scheme.lower() != "https":
            raise _SourceFailed(
                f"{current} redirected to {target}, from https to plain http, where anyone on "
                "the network path could change the bytes; refused. Use an address that stays "
                "on https"
            )
        current = target
    raise _SourceFailed(f"more than {_MAX_REDIRECTS} redirects")


def _fetch_once(
    session: requests.Session,
    url: str,
    part: _Partial,
    *,
    size: int | None,
    max_bytes: int | None,
    timeout: float,
    deadline: float | None,
    ends: float | None,
    progress: bool,
    label: str,
) -> None:
    """Fetches the rest of ``url`` into ``part`` and returns once it holds the whole file.

    Raises:
        _RetryableError: If the transfer broke after the server had answered.
        _SourceFailed: If the server answered with something that is not the file.
    """
    _raise_if_late(ends, deadline, part)
    offset, headers = _resume_request(part)
    with _open(session, url, headers, timeout=timeout, ends=ends) as resp:
        if _check_answer(resp, part, offset):
            return  # the previous call had already received every byte
        offset, total = _announced_range(resp, part, offset)
        _check_announced_size(part, total, size=size, max_bytes=max_bytes)
        _receive(resp, part, offset, total, max_bytes=max_bytes, deadline=deadline, ends=ends,
                 progress=progress, label=label)

    received = part.path.stat().st_size
    if total is not None and received < total:
        raise _RetryableError(f"connection closed after {received} of {total} bytes")
    if total is not None and received > total:
        part.discard()
        raise _SourceFailed(f"received {received} bytes but the server announced {total}")


def _resume_request(part: _Partial) -> tuple[int, dict[str, str]]:
    """The byte to resume from (0: the whole file) and the request headers that ask for it."""
    offset = part.path.stat().st_size if part.path.is_file() else 0
    if offset and part.validator is None:
        # Nothing proves the partial bytes come from the file the server has now, and a
        # splice of two versions is a file that never existed: start over instead.
        offset = 0
    # identity: the stored bytes must be the file itself, whatever the server would compress.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        # The server sends the rest only if the file is unchanged, else the whole new file.
        headers["If-Range"] = part.validator or ""
    return offset, headers


def _check_answer(resp: requests.Response, part: _Partial, offset: int) -> bool:
    """Refuses an answer that is not the file; returns True when it says the partial file
    already holds every byte (416 at its very end).

    Raises:
        _RetryableError: The partial file is longer than the remote one (it is discarded).
        _SourceFailed: An HTTP error, or an HTML page instead of the file.
    """
    if resp.status_code == 416 and offset:
        total = _content_range(resp.headers.get("Content-Range", ""))[1]
        if total == offset:
            return True
        # The partial file is longer than the remote one, so it cannot be resumed.
        part.discard()
        raise _RetryableError("partial download did not match the remote file")
    if resp.status_code >= 400:
        raise _SourceFailed(f"HTTP {resp.status_code} {resp.reason}")
    if resp.headers.get("Content-Type", "").lower().startswith("text/html"):
        raise _SourceFailed("the server sent an HTML page instead of the file (an error "
                            "or sign-in page?)")
    return False


def _announced_range(resp: requests.Response, part: _Partial,
                     offset: int) -> tuple[int, int | None]:
    """Where the answer's bytes start (``offset``, or 0 for the whole file again) and the
    file's total size where the server says it; a fresh start keeps the answer's validator.

    Raises:
        _RetryableError: The server resumed elsewhere, or the file changed on the server
            (the partial file is discarded).
    """
    length = resp.headers.get("Content-Length")
    current = _validator_of(resp.headers)
    if resp.status_code == 206:
        start, total = _content_range(resp.headers.get("Content-Range", ""))
        if start != offset:
            part.discard()
            raise _RetryableError(f"server resumed at byte {start} instead of {offset}")
        if offset and current is not None and current != part.validator:
            # A server that ignores If-Range but reports the new version.
            part.discard()
            raise _RetryableError("the file changed on the server; starting over")
        if total is None and length is not None:
            total = offset + int(length)
    else:
        # The whole file (again): the server ignored Range, or If-Range saw a new version.
        offset = 0
        total = int(length) if length is not None else None
    if offset == 0:
        part.set_validator(current)
    return offset, total


def _check_announced_size(part: _Partial, total: int | None, *, size: int | None,
                          max_bytes: int | None) -> None:
    """Refuses (discarding the partial file) a file announced at another size than
    expected, or over the size cap."""
    if total is not None and size is not None and total != size:
        part.discard()
        raise _SourceFailed(f"the server announces {total} bytes, expected {size}")
    if total is not None and max_bytes is not None and total > max_bytes:
        part.discard()
        raise _SourceFailed(f"the server announces {total} bytes, more than the size cap "
                            f"of {_bytes(max_bytes)}; nothing was kept")


def _receive(resp: requests.Response, part: _Partial, offset: int, total: int | None, *,
             max_bytes: int | None, deadline: float | None, ends: float | None,
             progress: bool, label: str) -> None:
    """Appends the answer's bytes to the partial file (from ``offset``), with a progress bar.

    Raises:
        _SourceFailed: The download passed the size cap (the partial file is removed), or
            the deadline passed.
        _RetryableError: The transfer broke.
    """
    from tqdm.auto import tqdm

    received, over_cap = offset, False
    with (
        part.path.open("ab" if offset else "wb") as f,
        tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
             desc=label, disable=not progress) as bar,
    ):
        for chunk in _network_chunks(resp):
            if max_bytes is not None and received + len(chunk) > max_bytes:
                over_cap = True
                break
            f.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
            _raise_if_late(ends, deadline, part)
    if over_cap:
        part.discard()
        raise _SourceFailed(f"the download passed the size cap of {_bytes(max_bytes)} and "
                            "was stopped; the partial file was removed")


def _network_chunks(resp: requests.Response) -> Iterator[bytes]:
    import requests
    import urllib3

    raw = resp.raw
    try:
        while True:
            # read1 returns what one socket read brings, so the deadline is checked between
            # reads even when a server trickles; decode_content=False keeps the raw bytes.
            if hasattr(raw, "read1"):
                chunk = raw.read1(_CHUNK_SIZE, decode_content=False)
            else:  # urllib3 1.x: its http.client response never decodes
                chunk = raw._fp.read1(_CHUNK_SIZE)
            if not chunk:
                return
            yield chunk
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


# ----------------------------------------------------------------------------- BreakHis


def download_breakhis(
    dest: str | Path = "data",
    source: str = "auto",
    *,
    sha256: str | None = BREAKHIS_SHA256,
    size: int | None = BREAKHIS_SIZE,
    progress: bool = True,
    timeout: float = 30.0,
    deadline: float | None = _BREAKHIS_DEADLINE_S,
    keep_archive: bool = True,
) -> Path:
    """Downloads and extracts BreakHis v1 unless it is already present.

    Nothing is fetched when ``dest/BreaKHis_v1`` holds a finished extraction (our
    ``.complete`` marker, or a hand-extracted ``histology_slides`` tree with PNGs), and
    a hand-placed ``dest/BreaKHis_v1.tar.gz`` is extracted without downloading. HTTP
    downloads (through :func:`fetch_url`) stream into ``dest/BreaKHis_v1.tar.gz.part`` and
    resume from it, both within a call (up to 3 retries after a broken connection) and
    across calls; the ETag or Last-Modified date of the first answer, kept in
    ``BreaKHis_v1.tar.gz.part.json``, makes sure a file changed on the server is fetched
    whole instead of spliced. Extraction goes through a temporary folder, so
    ``dest/BreaKHis_v1`` only ever appears complete. An archive that turns out not to be
    BreakHis is moved aside to ``BreaKHis_v1.tar.gz.bad`` (a download that is not even a
    tar file is deleted), never silently reused.

    Args:
        dest: Folder that receives the archive and the extracted ``BreaKHis_v1`` tree.
        source: ``"auto"`` (UFPR, then the Google Drive mirror), ``"ufpr"``,
            ``"gdrive"``, or an explicit ``http(s)://`` URL of the tarball.
        sha256: Expected SHA-256 hex digest of the archive; ``None`` skips the check.
        size: Expected archive size in bytes; ``None`` skips the check.
        progress: Show a progress bar and status messages (logged instead when False).
        timeout: Seconds to wait for the server to connect or send data.
        deadline: Seconds one source may take for the whole download (6 hours by default);
            a rerun resumes where it stopped. None for no limit.
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

    downloaded = False
    if archive.is_file():
        _say(f"Found {archive}; extracting it instead of downloading.", progress)
        _verify_placed_archive(archive, sha256=sha256, size=size)
    else:
        downloaded = True
        _download(sources, dest, sha256=sha256, size=size, progress=progress, timeout=timeout,
                  deadline=deadline)

    _extract(archive, root, progress=progress, downloaded=downloaded)
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


def _verify_placed_archive(archive: Path, *, sha256: str | None, size: int | None) -> None:
    """Checks an archive found in place (not downloaded) against the expected SHA-256 and
    size, leaving it where it is; a DownloadError says how to replace it."""
    try:
        _check_file(archive, sha256=sha256, size=size, max_bytes=None, remove=False)
    except _SourceFailed as exc:
        raise DownloadError(
            f"{archive} failed verification ({exc}). Replace it with a good copy of "
            f"{_ARCHIVE_NAME} from {BREAKHIS_PAGE} , or delete it and run again to "
            "download it."
        ) from None


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
        "images. Move or delete it and run again, or train on a complete copy you have with "
        "`bcd train --data PATH`."
    )


def _download(
    sources: list[tuple[str, str]],
    dest: Path,
    *,
    sha256: str | None,
    size: int | None,
    progress: bool,
    timeout: float,
    deadline: float | None,
) -> None:
    archive = dest / _ARCHIVE_NAME
    reasons: list[str] = []
    for index, (label, target) in enumerate(sources):
        try:
            if label == "gdrive" and not target:
                raise _SourceFailed("no Google Drive mirror id is set (BCD_BREAKHIS_GDRIVE_ID, "
                                    "or --source gdrive:FILE_ID)")
            url = f"https://drive.google.com/uc?id={target}" if label == "gdrive" else target
            _fetch(url, archive, sha256=sha256, size=size, max_bytes=_BREAKHIS_MAX_BYTES,
                   timeout=timeout, deadline=deadline, resume=True, progress=progress)
        except _SourceFailed as exc:
            reasons.append(f"{label}: {exc}")
            if index + 1 < len(sources):
                _say(f"Download from {label} failed ({exc}); trying the next source.", progress)
            continue
        # A partial HTTP download is useless once another source delivered the archive.
        _Partial(dest / f"{_ARCHIVE_NAME}.part", "", persist=True).discard()
        return
    raise DownloadError(
        f"Could not download BreakHis ({'; '.join(reasons)}). Download {_ARCHIVE_NAME} by "
        f"hand from {BREAKHIS_PAGE} , put it at {archive} (or extract it under {dest}/) "
        "and run again, or train on an extracted copy with `bcd train --data PATH`."
    )


def _set_aside(archive: Path, downloaded: bool, *, delete_download: bool) -> str:
    """Gets a bad archive out of the way; returns the end of a sentence saying where it went.

    A download is deleted only when asked (a rerun fetches it again); a hand-placed archive
    may be the user's only copy, so it is renamed, never deleted.
    """
    if downloaded and delete_download:
        archive.unlink(missing_ok=True)
        return "was deleted"
    aside = archive.with_name(archive.name + ".bad")
    n = 1
    while aside.exists():
        aside = archive.with_name(f"{archive.name}.bad{n}")
        n += 1
    os.replace(archive, aside)
    return f"was moved aside to {aside} (delete it once you no longer need it)"


def _corrupt(archive: Path, downloaded: bool, exc: BaseException) -> DownloadError:
    where = _set_aside(archive, downloaded, delete_download=True)
    return DownloadError(
        f"{archive} is corrupt or truncated ({exc}) and {where}. Run again to download it "
        "again."
    )


def _extract(archive: Path, root: Path, *, progress: bool, downloaded: bool) -> None:
    try:
        is_tar = tarfile.is_tarfile(archive)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        # is_tarfile reads the first member, so a gzip cut short inside it fails here.
        raise _corrupt(archive, downloaded, exc) from exc
    if not is_tar:
        where = _set_aside(archive, downloaded, delete_download=True)
        raise DownloadError(
            f"{archive} is not a tar archive (an HTML error page saved by mistake?) and "
            f"{where}. Run again to download it, or download {_ARCHIVE_NAME} by hand from "
            f"{BREAKHIS_PAGE} and put it at {archive}."
        )
    _say(f"Extracting {archive} ...", progress)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_DIRNAME}.tmp-", dir=root.parent))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                _safe_extract(tar, tmp)
        except _UnsafeMember as exc:
            # Kept even when downloaded: it is the evidence of a tampered mirror.
            where = _set_aside(archive, downloaded, delete_download=False)
            raise DownloadError(
                f"Refusing to extract unsafe tar member {exc}; {archive} is not the original "
                f"BreakHis archive and {where}. Run again to download a fresh copy, or "
                f"download {_ARCHIVE_NAME} by hand from {BREAKHIS_PAGE} ."
            ) from None
        except (tarfile.ReadError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            # Checked before OSError: BadGzipFile is one, yet it means a corrupt archive
            # rather than a local problem such as a full disk.
            raise _corrupt(archive, downloaded, exc) from exc
        except (tarfile.TarError, OSError) as exc:
            raise DownloadError(
                f"Extracting {archive} into {root.parent} failed ({exc}). Fix the cause "
                "(free disk space? permissions?) and run again; the archive is kept."
            ) from exc

        top = _dataset_top(tmp)
        if not _has_slides(top):
            where = _set_aside(archive, downloaded, delete_download=False)
            raise DownloadError(
                f"{archive} does not contain a {_SLIDES_DIRNAME} folder with PNG images, so "
                f"it is not the BreakHis dataset, and {where}. Run again to download it, or "
                f"download {_ARCHIVE_NAME} by hand from {BREAKHIS_PAGE} ."
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
        raise _UnsafeMember(f"{name!r} ({problem})")

"""Tests for the BreakHis downloader against a local HTTP server."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import sys
import tarfile
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from breast_cancer_detection.data import download
from breast_cancer_detection.data.download import DownloadError, download_breakhis

BENIGN = (
    "BreaKHis_v1/histology_slides/breast/benign/SOB/adenosis/SOB_B_A_14-22549AB/40X/"
    "SOB_B_A-14-22549AB-40-001.png"
)
MALIGNANT = (
    "BreaKHis_v1/histology_slides/breast/malignant/SOB/ductal_carcinoma/SOB_M_DC_14-2523/40X/"
    "SOB_M_DC-14-2523-40-001.png"
)


def _png_bytes(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def _make_tarball(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def tarball() -> bytes:
    return _make_tarball(
        [(BENIGN, _png_bytes((200, 80, 160))), (MALIGNANT, _png_bytes((90, 20, 120)))]
    )


@dataclass
class _ServerState:
    body: bytes
    mode: str = "normal"
    ranges: list[str | None] = field(default_factory=list)
    if_ranges: list[str | None] = field(default_factory=list)
    cut_done: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Server:
    url: str
    state: _ServerState


def _etag(body: bytes) -> str:
    # Strong ETag derived from the content, as a static file server gives: it changes
    # whenever the file does.
    return f'"{hashlib.sha256(body).hexdigest()[:16]}"'


def _write_part(dest: Path, data: bytes, etag: str | None) -> Path:
    """A partial download as an earlier call leaves it: the bytes and, beside them, the
    validator of the answer they came from."""
    part = dest / "BreaKHis_v1.tar.gz.part"
    part.write_bytes(data)
    if etag is not None:
        meta = {"url": "http://example.invalid/BreaKHis_v1.tar.gz", "validator": etag}
        (dest / "BreaKHis_v1.tar.gz.part.json").write_text(json.dumps(meta))
    return part


class _Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # keep pytest output clean

    def do_GET(self) -> None:  # noqa: N802
        state: _ServerState = self.server.state  # type: ignore[attr-defined]
        range_header = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        with state.lock:
            state.ranges.append(range_header)
            state.if_ranges.append(if_range)
            mode = state.mode
            cut = mode == "cut_always" or (mode == "cut" and not state.cut_done)
            if cut:
                state.cut_done = True
        body = state.body

        if mode == "html":
            page = b"<html><body>Service temporarily unavailable</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        if mode == "garbage":
            body = b"this is not a tarball\n" * 40

        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        # RFC 9110: a Range whose If-Range does not match the current file is ignored.
        stale = if_range is not None and if_range != _etag(body)
        if match is not None and mode != "norange" and not stale:
            start = int(match[1])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            if mode != "pieces":
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        elif mode == "pieces":
            # Valid 206 answers that cover only part of the file, even unasked.
            self.send_response(206)
        else:
            self.send_response(200)
        end = len(body)
        if mode == "pieces":
            end = min(end, start + len(body) // 2 + 1)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
        payload = body[start:end]
        self.send_header("ETag", _etag(body))
        self.send_header("Content-Type", "application/x-gzip")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if cut:
            # Announce the full length but drop the connection halfway, like a flaky link.
            self.wfile.write(payload[: len(payload) // 2])
            self.close_connection = True
            return
        self.wfile.write(payload)


@pytest.fixture
def server(tarball: bytes) -> Iterator[Server]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    state = _ServerState(body=tarball)
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        host, port = httpd.server_address[:2]
        yield Server(url=f"http://{host}:{port}/BreaKHis_v1.tar.gz", state=state)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_RETRY_DELAY_S", 0.0)


@pytest.fixture
def closed_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}/BreaKHis_v1.tar.gz"


def _assert_complete(root: Path, dest: Path) -> None:
    assert root == dest / "BreaKHis_v1"
    assert (dest / BENIGN).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (dest / MALIGNANT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / ".complete").is_file()
    assert not list(dest.glob(".BreaKHis_v1.tmp-*"))
    assert not (dest / "BreaKHis_v1.tar.gz.part").exists()


def _assert_nothing_extracted(dest: Path) -> None:
    assert not (dest / "BreaKHis_v1").exists()
    assert not list(dest.glob(".BreaKHis_v1.tmp-*"))


def test_success(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "data"
    root = download_breakhis(dest, server.url, progress=False)
    _assert_complete(root, dest)
    assert server.state.ranges == [None]
    assert (dest / "BreaKHis_v1.tar.gz").read_bytes() == server.state.body


def test_keep_archive_false_deletes_archive(server: Server, tmp_path: Path) -> None:
    root = download_breakhis(tmp_path, server.url, progress=False, keep_archive=False)
    _assert_complete(root, tmp_path)
    assert not (tmp_path / "BreaKHis_v1.tar.gz").exists()


def test_second_call_makes_no_request(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = download_breakhis(tmp_path, server.url, progress=False)
    seen = len(server.state.ranges)
    capsys.readouterr()
    second = download_breakhis(tmp_path, server.url, progress=True)
    assert second == first
    assert len(server.state.ranges) == seen
    assert "already present" in capsys.readouterr().out


def test_hand_extracted_tree_counts_as_present(server: Server, tmp_path: Path) -> None:
    png = tmp_path / BENIGN
    png.parent.mkdir(parents=True)
    png.write_bytes(_png_bytes((1, 2, 3)))
    root = download_breakhis(tmp_path, server.url, progress=False)
    assert root == tmp_path / "BreaKHis_v1"
    assert server.state.ranges == []
    assert not (root / ".complete").exists()


def test_foreign_folder_at_root_is_not_overwritten(server: Server, tmp_path: Path) -> None:
    keep = tmp_path / "BreaKHis_v1" / "notes.txt"
    keep.parent.mkdir()
    keep.write_text("mine")
    with pytest.raises(DownloadError, match="Move or delete it"):
        download_breakhis(tmp_path, server.url, progress=False)
    assert keep.read_text() == "mine"
    assert server.state.ranges == []


def test_resume_after_cut_within_one_call(server: Server, tmp_path: Path) -> None:
    server.state.mode = "cut"
    half = len(server.state.body) // 2
    root = download_breakhis(tmp_path, server.url, progress=False)
    _assert_complete(root, tmp_path)
    assert server.state.ranges == [None, f"bytes={half}-"]
    assert server.state.if_ranges == [None, _etag(server.state.body)]


def test_resume_across_calls(server: Server, tmp_path: Path) -> None:
    body = server.state.body
    n = len(body) // 3
    _write_part(tmp_path, body[:n], _etag(body))
    root = download_breakhis(tmp_path, server.url, progress=False)
    _assert_complete(root, tmp_path)
    assert server.state.ranges == [f"bytes={n}-"]
    assert server.state.if_ranges == [_etag(body)]
    assert (tmp_path / "BreaKHis_v1.tar.gz").read_bytes() == body
    assert not (tmp_path / "BreaKHis_v1.tar.gz.part.json").exists()


def test_part_without_validator_starts_over(server: Server, tmp_path: Path) -> None:
    # A .part from before validators were stored: nothing proves its bytes match the
    # server's file, so it is fetched whole rather than spliced.
    body = server.state.body
    _write_part(tmp_path, b"x" * (len(body) // 3), etag=None)
    root = download_breakhis(tmp_path, server.url, progress=False)
    _assert_complete(root, tmp_path)
    assert server.state.ranges == [None]
    assert (tmp_path / "BreaKHis_v1.tar.gz").read_bytes() == body


def test_complete_part_answered_416_is_used(server: Server, tmp_path: Path) -> None:
    body = server.state.body
    _write_part(tmp_path, body, _etag(body))
    root = download_breakhis(tmp_path, server.url, progress=False)
    _assert_complete(root, tmp_path)
    assert server.state.ranges == [f"bytes={len(body)}-"]


def test_short_range_answers_are_completed(server: Server, tmp_path: Path) -> None:
    server.state.mode = "pieces"
    piece = len(server.state.body) // 2 + 1
    root = download_breakhis(tmp_path, server.url, progress=False)
    _assert_complete(root, tmp_path)
    assert server.state.ranges == [None, f"bytes={piece}-"]


def test_retries_exhausted_keeps_part(server: Server, tmp_path: Path) -> None:
    server.state.mode = "cut_always"
    part = tmp_path / "BreaKHis_v1.tar.gz.part"
    with pytest.raises(DownloadError) as excinfo:
        download_breakhis(tmp_path, server.url, progress=False)
    message = str(excinfo.value)
    assert str(part) in message
    assert "resumes" in message
    assert len(server.state.ranges) == 1 + download._MAX_RETRIES
    assert 0 < part.stat().st_size < len(server.state.body)
    _assert_nothing_extracted(tmp_path)


def test_sha256_match_succeeds(server: Server, tmp_path: Path) -> None:
    digest = hashlib.sha256(server.state.body).hexdigest()
    root = download_breakhis(tmp_path, server.url, sha256=digest, progress=False)
    _assert_complete(root, tmp_path)


def test_sha256_mismatch(server: Server, tmp_path: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(DownloadError) as excinfo:
        download_breakhis(tmp_path, server.url, sha256=wrong, progress=False)
    message = str(excinfo.value)
    assert "SHA-256 mismatch" in message
    assert wrong in message
    assert hashlib.sha256(server.state.body).hexdigest() in message
    _assert_nothing_extracted(tmp_path)
    assert not (tmp_path / "BreaKHis_v1.tar.gz.part").exists()
    assert not (tmp_path / "BreaKHis_v1.tar.gz").exists()


def test_size_mismatch(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="expected 123"):
        download_breakhis(tmp_path, server.url, size=123, progress=False)
    _assert_nothing_extracted(tmp_path)
    assert not (tmp_path / "BreaKHis_v1.tar.gz.part").exists()


def test_html_page_is_rejected(server: Server, tmp_path: Path) -> None:
    server.state.mode = "html"
    with pytest.raises(DownloadError, match="sent an HTML page"):
        download_breakhis(tmp_path, server.url, progress=False)
    _assert_nothing_extracted(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_non_tarball_download_is_deleted(server: Server, tmp_path: Path) -> None:
    server.state.mode = "garbage"
    with pytest.raises(DownloadError, match="not a tar archive"):
        download_breakhis(tmp_path, server.url, progress=False)
    _assert_nothing_extracted(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_server_ignoring_range_restarts_cleanly(server: Server, tmp_path: Path) -> None:
    server.state.mode = "norange"
    stale = b"stale bytes that must not end up in the archive"
    _write_part(tmp_path, stale, _etag(server.state.body))
    root = download_breakhis(tmp_path, server.url, progress=False)
    _assert_complete(root, tmp_path)
    assert server.state.ranges == [f"bytes={len(stale)}-"]
    assert (tmp_path / "BreaKHis_v1.tar.gz").read_bytes() == server.state.body


def test_offline_message_says_what_to_do(closed_url: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as excinfo:
        download_breakhis(tmp_path, closed_url, progress=False, timeout=5)
    message = str(excinfo.value)
    assert "by hand" in message
    assert "--data" in message
    assert str(tmp_path / "BreaKHis_v1.tar.gz") in message
    _assert_nothing_extracted(tmp_path)


def test_auto_reports_both_sources(
    closed_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download, "BREAKHIS_URL", closed_url)
    monkeypatch.setattr(download, "BREAKHIS_GDRIVE_ID", "mirror-id")
    monkeypatch.setitem(sys.modules, "gdown", None)  # makes `import gdown` fail
    with pytest.raises(DownloadError) as excinfo:
        download_breakhis(tmp_path, "auto", progress=False, timeout=5)
    message = str(excinfo.value)
    assert "ufpr:" in message
    assert "gdrive:" in message
    assert "pip install gdown" in message
    assert "by hand" in message


def test_auto_falls_back_to_gdrive(
    closed_url: str, tarball: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, object]] = []

    def fake_download(*, id: str, output: str, quiet: bool, resume: bool) -> str:  # noqa: A002
        calls.append({"id": id, "quiet": quiet, "resume": resume})
        Path(output).write_bytes(tarball)
        return output

    monkeypatch.setattr(download, "BREAKHIS_URL", closed_url)
    monkeypatch.setattr(download, "BREAKHIS_GDRIVE_ID", "mirror-id")
    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=fake_download))
    root = download_breakhis(tmp_path, "auto", progress=False, timeout=5)
    _assert_complete(root, tmp_path)
    assert calls == [{"id": download.BREAKHIS_GDRIVE_ID, "quiet": True, "resume": True}]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".gdrive")] == []


@pytest.mark.parametrize(
    ("error", "expected"),
    [(OSError("disk full"), DownloadError), (RuntimeError("boom"), RuntimeError)],
)
def test_failure_during_extraction_leaves_nothing(
    server: Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    expected: type[Exception],
) -> None:
    written: list[Path] = []

    def failing_extract(tar: tarfile.TarFile, dest: Path) -> None:
        partial = dest / BENIGN
        partial.parent.mkdir(parents=True)
        partial.write_bytes(b"half a png")
        written.append(partial)
        raise error

    monkeypatch.setattr(download, "_safe_extract", failing_extract)
    with pytest.raises(expected):
        download_breakhis(tmp_path, server.url, progress=False)
    assert written, "the patched extraction step never ran"
    assert not written[0].exists()
    _assert_nothing_extracted(tmp_path)
    # The archive itself was fine, so it is kept for the next attempt.
    assert (tmp_path / "BreaKHis_v1.tar.gz").read_bytes() == server.state.body


def test_hand_placed_archive_is_extracted_without_request(
    server: Server, tarball: bytes, tmp_path: Path
) -> None:
    (tmp_path / "BreaKHis_v1.tar.gz").write_bytes(tarball)
    root = download_breakhis(tmp_path, server.url, progress=False)
    _assert_complete(root, tmp_path)
    assert server.state.ranges == []


def test_hand_placed_archive_with_wrong_sha256_is_kept(tarball: bytes, tmp_path: Path) -> None:
    archive = tmp_path / "BreaKHis_v1.tar.gz"
    archive.write_bytes(tarball)
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        download_breakhis(tmp_path, "http://127.0.0.1:9/unused", sha256="0" * 64, progress=False)
    assert archive.read_bytes() == tarball
    _assert_nothing_extracted(tmp_path)


def test_archive_with_other_top_folder_is_used(tmp_path: Path) -> None:
    renamed = [
        (name.replace("BreaKHis_v1/", "breakhis-copy/", 1), _png_bytes((5, 5, 5)))
        for name in (BENIGN, MALIGNANT)
    ]
    (tmp_path / "BreaKHis_v1.tar.gz").write_bytes(_make_tarball(renamed))
    root = download_breakhis(tmp_path, "http://127.0.0.1:9/unused", progress=False)
    _assert_complete(root, tmp_path)


def test_archive_without_slides_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "BreaKHis_v1.tar.gz").write_bytes(
        _make_tarball([("BreaKHis_v1/readme.txt", b"no images here")])
    )
    with pytest.raises(DownloadError, match="histology_slides"):
        download_breakhis(tmp_path, "http://127.0.0.1:9/unused", progress=False)
    _assert_nothing_extracted(tmp_path)


def _evil_member(kind: str, outside: Path) -> tarfile.TarInfo | tuple[str, bytes]:
    if kind == "dotdot":
        return ("../evil.png", b"evil")
    if kind == "nested-dotdot":
        return ("BreaKHis_v1/../../evil.png", b"evil")
    if kind == "absolute":
        # Points into this test's own folder so a broken check cannot litter the real /tmp.
        return (str(outside / "evil.png"), b"evil")
    info = tarfile.TarInfo("BreaKHis_v1/histology_slides/link.png")
    info.type = tarfile.SYMTYPE
    info.linkname = "../../../evil.png"
    return info


@pytest.mark.parametrize("kind", ["dotdot", "nested-dotdot", "absolute", "symlink-outside"])
@pytest.mark.parametrize("stdlib_filter", [True, False], ids=["with-filter", "own-check-only"])
def test_unsafe_member_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, stdlib_filter: bool
) -> None:
    if not stdlib_filter:
        # Pythons before 3.11.4 lack tarfile filters; the own check must suffice there.
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    dest = tmp_path / "data"
    dest.mkdir()
    # The safe member comes first, so refusing the evil one must also clean it up.
    members = [(BENIGN, _png_bytes((1, 1, 1))), _evil_member(kind, tmp_path)]
    (dest / "BreaKHis_v1.tar.gz").write_bytes(_make_tarball(members))
    with pytest.raises(DownloadError, match="Refusing to extract unsafe tar member"):
        download_breakhis(dest, "http://127.0.0.1:9/unused", progress=False)
    _assert_nothing_extracted(dest)
    assert not (dest / "evil.png").exists()
    assert not (tmp_path / "evil.png").exists()


def test_gdrive_without_a_mirror_id_says_how_to_set_one(
    closed_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download, "BREAKHIS_URL", closed_url)
    monkeypatch.setattr(download, "BREAKHIS_GDRIVE_ID", None)
    with pytest.raises(DownloadError, match="BCD_BREAKHIS_GDRIVE_ID"):
        download_breakhis(tmp_path, "auto", progress=False, timeout=5)


def test_gdrive_id_on_the_command_line(
    tarball: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []

    def fake_download(*, id: str, output: str, quiet: bool, resume: bool) -> str:  # noqa: A002
        seen.append(id)
        Path(output).write_bytes(tarball)
        return output

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=fake_download))
    download_breakhis(tmp_path, "gdrive:abc123", progress=False)
    assert seen == ["abc123"]

"""The downloader against hostile or broken servers, each started by the test on 127.0.0.1."""

from __future__ import annotations

import datetime
import gzip
import hashlib
import inspect
import io
import ipaddress
import re
import ssl
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from breast_cancer_detection.data import download
from breast_cancer_detection.data.download import DownloadError, download_breakhis
from breast_cancer_detection.engine import CheckpointError
from breast_cancer_detection.hub import fetch_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = bytes(range(256)) * 40  # 10 KiB standing in for a checkpoint


# ----------------------------------------------------------------------------- servers


@dataclass
class Site:
    """A running test server: its base URL and the requests it has seen."""

    url: str
    seen: list[dict[str, str]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self.server.seen.append({"path": self.path, **dict(self.headers)})  # type: ignore[attr-defined]
        try:
            self.server.respond(self)  # type: ignore[attr-defined]
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up, which several tests expect it to do

    def log_message(self, *args: object) -> None:
        pass  # keep pytest output clean


Respond = Callable[[BaseHTTPRequestHandler], None]


@pytest.fixture
def serve() -> Iterator[Callable[..., Site]]:
    """Starts servers that answer every GET with ``respond(handler)``; stops them after."""
    with ExitStack() as stack:

        def start(respond: Respond, tls: ssl.SSLContext | None = None) -> Site:
            httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            httpd.daemon_threads = True
            site = Site(url="")
            httpd.respond, httpd.seen = respond, site.seen  # type: ignore[attr-defined]
            if tls is not None:
                httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
            thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
            thread.start()
            stack.callback(httpd.server_close)
            stack.callback(httpd.shutdown)
            site.url = f"{'https' if tls else 'http'}://127.0.0.1:{httpd.server_address[1]}"
            return site

        yield start


def _send(h: BaseHTTPRequestHandler, body: bytes, *, status: int = 200,
          headers: dict[str, str] | None = None, length: bool = True) -> None:
    h.send_response(status)
    h.send_header("Content-Type", "application/octet-stream")
    for name, value in (headers or {}).items():
        h.send_header(name, value)
    if length:
        h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cache_files(cache: Path) -> list[str]:
    folder = cache / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture(autouse=True)
def _no_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_RETRY_DELAY_S", 0.0)


# ----------------------------------------------------------------------------- 8: torch floor


def _floor(spec: str, name: str) -> str:
    from packaging.requirements import Requirement

    for line in spec.splitlines():
        line = line.split(" #")[0].strip().strip('",')
        if line and not line.startswith("#") and Requirement(line).name == name:
            return str(Requirement(line).specifier)
    raise AssertionError(f"{name} is not listed")


@pytest.mark.parametrize("file", ["pyproject.toml", "requirements.txt"])
def test_torch_floor_is_the_first_release_with_safe_weights_only(file: str) -> None:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    text = (ROOT / file).read_text(encoding="utf-8")
    if file == "pyproject.toml":
        text = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    torch_spec = SpecifierSet(_floor(text, "torch"))
    vision_spec = SpecifierSet(_floor(text, "torchvision"))
    # torch.load(weights_only=True) could still run code before 2.6 (CVE-2025-32434).
    assert not torch_spec.contains("2.5.1") and torch_spec.contains("2.6.0")
    assert not vision_spec.contains("0.20.1") and vision_spec.contains("0.21.0")
    # ...and the torch this suite runs on still satisfies the floor.
    assert torch_spec.contains(Version(torch.__version__).base_version)


# ----------------------------------------------------------------------------- 9: checkpoints


def test_plain_http_without_a_hash_is_refused_before_any_request(serve, tmp_path):
    site = serve(lambda h: _send(h, PAYLOAD))
    url = f"{site.url}/model.pt"
    with pytest.raises(CheckpointError) as excinfo:
        fetch_checkpoint(url, cache=tmp_path, progress=False)
    message = str(excinfo.value)
    assert url in message and "https://" in message and "#sha256=" in message
    assert site.seen == []
    # With a hash the same address is fine: the hash catches a swapped file.
    got = fetch_checkpoint(f"{url}#sha256={_sha(PAYLOAD)}", cache=tmp_path, progress=False)
    assert got.read_bytes() == PAYLOAD


def _tls_context(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context with a fresh self-signed certificate for 127.0.0.1, and its file."""
    crypto = pytest.importorskip("cryptography")
    del crypto
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, False, False, False),
                       critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file


def test_redirect_from_https_to_http_is_refused(serve, tmp_path, monkeypatch):
    tls, cert_file = _tls_context(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert_file))  # requests trusts our test CA
    plain = serve(lambda h: _send(h, PAYLOAD))

    def respond(h: BaseHTTPRequestHandler) -> None:
        if h.path == "/model.pt":
            _send(h, PAYLOAD)
        else:
            _send(h, b"", status=302, headers={"Location": f"{plain.url}/model.pt"})

    secure = serve(respond, tls=tls)
    cache = tmp_path / "cache"
    # https itself works, without a hash: so the refusal below is not a TLS failure.
    assert fetch_checkpoint(f"{secure.url}/model.pt", cache=cache,
                            progress=False).read_bytes() == PAYLOAD
    # Even with a hash, a downgrade to http is refused.
    with pytest.raises(CheckpointError, match="from https to plain http") as excinfo:
        fetch_checkpoint(f"{secure.url}/moved.pt#sha256={_sha(PAYLOAD)}", cache=cache,
                         progress=False)
    assert f"{plain.url}/model.pt" in str(excinfo.value)
    assert plain.seen == []
    assert [p for p in _cache_files(cache) if "moved" in p] == []


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "no-length"])
def test_size_cap_stops_the_download_and_removes_the_partial_file(serve, tmp_path, announced):
    big = b"x" * 5000
    site = serve(lambda h: _send(h, big, length=announced))
    with pytest.raises(CheckpointError) as excinfo:
        fetch_checkpoint(f"{site.url}/big.pt#sha256={_sha(big)}", cache=tmp_path,
                         max_bytes=1000, progress=False)
    assert "size cap of 1000 bytes" in str(excinfo.value)
    assert "max_bytes" in str(excinfo.value)
    assert _cache_files(tmp_path) == []  # neither the file nor a partial one
    # The default cap is 2 GiB.
    assert inspect.signature(fetch_checkpoint).parameters["max_bytes"].default == 2 << 30


def test_gzip_encoded_answer_is_stored_raw(serve, tmp_path):
    # A server that compresses on the fly: the published hash is that of the bytes it sends.
    body = gzip.compress(PAYLOAD)

    def respond(h: BaseHTTPRequestHandler) -> None:
        _send(h, body, headers={"Content-Encoding": "gzip"})

    site = serve(respond)
    got = fetch_checkpoint(f"{site.url}/model.pt.gz#sha256={_sha(body)}", cache=tmp_path,
                           progress=False)
    assert got.read_bytes() == body
    assert site.seen[0].get("Accept-Encoding") == "identity"


def test_two_threads_fetching_one_url_both_end_with_a_verified_file(serve, tmp_path):
    both_sending = threading.Barrier(2, timeout=10)

    def respond(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(PAYLOAD)))
        h.end_headers()
        h.wfile.write(PAYLOAD[:100])
        h.wfile.flush()
        both_sending.wait()  # both requests are in; give both clients time to open their
        time.sleep(0.3)      # files, so the two downloads really are half-written at once
        h.wfile.write(PAYLOAD[100:])

    site = serve(respond)
    url = f"{site.url}/model.pt#sha256={_sha(PAYLOAD)}"
    results: list[Path | BaseException] = []

    def fetch() -> None:
        try:
            results.append(fetch_checkpoint(url, cache=tmp_path, progress=False))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 2 and all(isinstance(r, Path) for r in results), results
    assert results[0] == results[1] and results[0].read_bytes() == PAYLOAD
    assert len(site.seen) == 2  # both really downloaded
    assert _cache_files(tmp_path) == [results[0].name]  # no temporary file left


@pytest.mark.slow
def test_trickling_server_hits_the_deadline(serve, tmp_path):
    def respond(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(PAYLOAD)))
        h.end_headers()
        for i in range(len(PAYLOAD)):
            # Each byte arrives well within any read timeout; only a deadline stops this.
            h.wfile.write(PAYLOAD[i:i + 1])
            h.wfile.flush()
            time.sleep(0.05)

    site = serve(respond)
    url = f"{site.url}/slow.pt"
    started = time.monotonic()
    with pytest.raises(CheckpointError) as excinfo:
        fetch_checkpoint(f"{url}#sha256={_sha(PAYLOAD)}", cache=tmp_path, deadline=1.0,
                         timeout=5.0, progress=False)
    elapsed = time.monotonic() - started
    assert url in str(excinfo.value) and "1 s deadline" in str(excinfo.value)
    # The whole payload takes over 500 s to trickle: well under that means the deadline cut it.
    assert 0.9 < elapsed < 30.0
    assert _cache_files(tmp_path) == []


# ----------------------------------------------------------------------------- 10: dataset


def _tarball(tag: bytes) -> bytes:
    png = b"\x89PNG\r\n\x1a\n" + tag * 200
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i in range(3):
            info = tarfile.TarInfo(
                f"BreaKHis_v1/histology_slides/breast/benign/SOB/adenosis/SOB_B_A_14-22549AB/"
                f"40X/SOB_B_A-14-22549AB-40-{i:03d}.png")
            data = png + bytes([i]) * 3000
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_file_changed_on_the_server_is_fetched_whole_not_spliced(serve, tmp_path):
    files = {"body": _tarball(b"old"), "cut": True}

    def respond(h: BaseHTTPRequestHandler) -> None:
        body = files["body"]
        etag = f'"{_sha(body)[:16]}"'
        match = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")
        # RFC 9110: Range is honoured unless If-Range names another version of the file.
        if match and h.headers.get("If-Range") in (None, etag):
            start = int(match[1])
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            start = 0
            h.send_response(200)
        rest = body[start:]
        h.send_header("ETag", etag)
        h.send_header("Content-Length", str(len(rest)))
        h.end_headers()
        h.wfile.write(rest[: len(rest) // 2] if files["cut"] else rest)
        h.close_connection = True

    site = serve(respond)
    url = f"{site.url}/BreaKHis_v1.tar.gz"
    old_etag = f'"{_sha(files["body"])[:16]}"'
    with pytest.raises(DownloadError, match="resumes"):
        download_breakhis(tmp_path, url, progress=False)  # every answer is cut halfway
    assert (tmp_path / "BreaKHis_v1.tar.gz.part").stat().st_size > 0

    files["body"], files["cut"] = _tarball(b"new"), False  # the file is replaced on the server
    site.seen.clear()
    root = download_breakhis(tmp_path, url, progress=False)
    assert site.seen[0].get("If-Range") == old_etag and site.seen[0].get("Range")
    assert (tmp_path / "BreaKHis_v1.tar.gz").read_bytes() == files["body"]
    assert (root / ".complete").is_file()


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_hand_placed_archive_that_fails_to_extract_is_moved_aside(tmp_path, content):
    good = _tarball(b"abc")
    data = b"not a tarball at all\n" * 50 if content == "garbage" else good[: len(good) // 2]
    archive = tmp_path / "BreaKHis_v1.tar.gz"
    archive.write_bytes(data)
    with pytest.raises(DownloadError) as excinfo:
        download_breakhis(tmp_path, "http://127.0.0.1:9/unused", progress=False)
    aside = tmp_path / "BreaKHis_v1.tar.gz.bad"
    assert str(aside) in str(excinfo.value)
    assert aside.read_bytes() == data  # the user's file, untouched
    assert not archive.exists()
    assert not (tmp_path / "BreaKHis_v1").exists()

"""Reading an upload: the files of a multipart request, within the body's size and time limits,
and the watch for a client that leaves once its body has been read."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .limits import MAX_FILES, ServeLimits
from .refusals import ClientGone, Refused


@dataclass
class Upload:
    """One uploaded file: its name (never a path) and its bytes."""

    name: str
    data: bytes


def _clean_name(filename: str | None, i: int) -> str:
    # Browsers send a bare name; other clients may send a path, which is nobody's business.
    name = Path((filename or "").replace("\\", "/")).name
    return name or f"file {i + 1}"


def _closing_delimiter(content_type: str) -> bytes | None:
    """``--BOUNDARY--`` of a multipart Content-Type, or None without a boundary (which the
    multipart parser refuses)."""
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        return None
    return b"--" + boundary.encode("latin-1", "replace") + b"--"


async def read_uploads(request: Request, max_bytes: int, max_mb: float,
                       timeout: float = ServeLimits.upload_timeout) -> list[Upload]:
    """The files of a multipart request, refusing it as soon as it passes ``max_bytes``, or
    ``timeout`` seconds.

    Raises:
        Refused: 408, 413, 415, 400 or 422, with a message.
        ClientGone: the client disconnected before sending the whole body.
    """
    too_large = Refused(413, f"the upload is larger than the {max_mb:g} MB limit; send "
                             "fewer or smaller images, or raise the limit (bcd serve "
                             "--max-upload-mb).")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_large  # refused before a byte of the body is read
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise Refused(415, "send the images as multipart/form-data, in the field 'files'.")
    received = 0
    # The close delimiter, --BOUNDARY--, ends the multipart data: a body cut short before it
    # would lose its last file silently (the parser ends its parts where the bytes end).
    closing = _closing_delimiter(request.headers.get("content-type", ""))
    closed, tail = False, b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    too_slow = Refused(408, f"the upload took longer than {timeout:g} s; send it again on a "
                            "faster connection, send fewer images, or raise the limit (bcd "
                            "serve --upload-timeout).", {"Connection": "close"})

    async def counting_receive():
        # Content-Length can be absent (chunked) or wrong: count what actually arrives.
        # One deadline for the whole body: a client trickling a byte a second must not keep
        # its upload place for ever.
        nonlocal received, closed, tail
        try:
            message = await asyncio.wait_for(request.receive(), deadline - loop.time())
        except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11 on
            raise too_slow from None
        if message["type"] == "http.disconnect":
            raise ClientGone(f"after {received:,} bytes")
        if message["type"] == "http.request":
            body = message.get("body", b"")
            received += len(body)
            if received > max_bytes:
                raise too_large
            if closing is not None and not closed:
                # Seen whole in this chunk, or across its start (``tail``: the previous
                # chunks' last bytes, one short of the delimiter).
                closed = closing in body or closing in tail + body[:len(closing) - 1]
                tail = (tail + body)[-(len(closing) - 1):]
        return message

    try:
        form = await _parse_form(Request(request.scope, counting_receive))
    except ClientDisconnect:
        raise ClientGone(f"after {received:,} bytes") from None
    try:
        return await _files(form, closed)
    finally:
        await form.close()


async def _parse_form(request: Request) -> FormData:
    """The multipart form of ``request``, with Starlette's refusals of malformed multipart data
    turned into ones that say what to send."""
    try:
        return await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
    except StarletteHTTPException as e:  # Starlette's answer to malformed multipart data
        detail = str(e.detail)
        if detail.startswith("Too many files"):
            raise Refused(413, f"more than {MAX_FILES} files in one request: send at most "
                               f"{MAX_FILES} files per request, and the rest in further "
                               "requests.") from e
        if detail.startswith("Too many fields"):
            raise Refused(413, f"more than {MAX_FILES} form fields in one request: send only "
                               f"images, in the field 'files', at most {MAX_FILES} per "
                               "request.") from e
        raise Refused(400, f"malformed upload: {detail}") from e


async def _files(form: FormData, closed: bool) -> list[Upload]:
    """The uploads of the field 'files' of a form whose body ended with its close delimiter
    (``closed``), or the status that says why not."""
    if not closed:
        raise Refused(400, "incomplete upload (no closing boundary): the body ended "
                           "before the end of its multipart data, so files may be "
                           "missing; send it again.")
    files = form.getlist("files")
    if not files:
        raise Refused(422, "no files: send one or more images in the multipart field "
                           "'files'.")
    if not all(isinstance(f, UploadFile) for f in files):
        raise Refused(422, "the field 'files' must hold file uploads, not text.")
    return [Upload(_clean_name(f.filename, i), await f.read()) for i, f in enumerate(files)]


async def watch_disconnect(request: Request, gone: threading.Event) -> None:
    """Sets ``gone`` when the client disconnects. Run once the body has been read, when the
    next message the server can send is the disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return
        await asyncio.sleep(0.05)  # a server that repeats empty bodies must not spin us

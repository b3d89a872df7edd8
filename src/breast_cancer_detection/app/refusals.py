"""How a request is turned away: :class:`Refused` (an error status and a message that says
what to change) and :class:`ClientGone` (nobody is left to answer), and their answers."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse


class Refused(Exception):
    """A request answered with an error status; the message says what to change."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class ClientGone(Exception):
    """The client closed the connection; nobody will read an answer."""


async def refused(request: Request, exc: Refused) -> JSONResponse:
    """The app's exception handler for :class:`Refused`: its status, message and headers."""
    return JSONResponse({"detail": exc.message}, exc.status, headers=exc.headers)


def gone() -> JSONResponse:
    """The answer to a client that left."""
    # Nobody reads this answer; 499 is the status servers log for a client that left.
    return JSONResponse({"detail": "the client disconnected."}, 499)

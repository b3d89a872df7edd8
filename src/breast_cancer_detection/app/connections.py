"""Connections: uvicorn's h11 protocol with a deadline for each request head, and the options
``uvicorn.run`` needs to bound connections as the app bounds requests."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .limits import CONNECTION_HEADROOM, ServeLimits

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .gate import Gate

log = logging.getLogger(__name__)


@functools.cache
def head_deadline_protocol(seconds: float) -> type:
    """Uvicorn's h11 protocol, closing every connection that has not sent a complete request
    head within ``seconds`` of opening, or of the end of its previous answer (keep-alive).

    Uvicorn bounds the wait for a request only while no byte arrives (its keep-alive timer,
    from the end of an answer); nothing bounds the time to receive a request head, so idle
    or trickling connections would hold their sockets, and file descriptors, for ever. For
    ``uvicorn.run(http=...)``; :func:`uvicorn_options` passes it.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineProtocol(H11Protocol):
        head_timeout = seconds

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._head_timer: asyncio.TimerHandle | None = None
            self._waiting_after = None  # the request whose answer the timer runs after

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._disarm_if_head_arrived()

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._arm()  # before a pipelined request waiting in the buffer is started
            super().on_response_complete()
            self._disarm_if_head_arrived()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._waiting_after = self.cycle
            self._head_timer = self.loop.call_later(self.head_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _disarm_if_head_arrived(self) -> None:
            # uvicorn starts a new cycle for each request head it has parsed whole.
            if self._head_timer is not None and self.cycle is not self._waiting_after:
                self._disarm()

        def _timed_out(self) -> None:
            self._head_timer = None
            # A connection upgraded to another protocol is no longer this one's business.
            if (self.transport.is_closing() or self.cycle is not self._waiting_after
                    or self.transport.get_protocol() is not self):
                return
            log.debug("closed a connection from %s: no complete request head within %g s.",
                      "{}:{}".format(*self.client) if self.client else "a client", seconds)
            self.transport.close()

    HeadDeadlineProtocol.__qualname__ = HeadDeadlineProtocol.__name__
    return HeadDeadlineProtocol


def uvicorn_options(app: FastAPI, header_timeout: float = ServeLimits.header_timeout
                    ) -> dict[str, Any]:
    """The settings ``uvicorn.run`` needs to bound connections as the app bounds requests.

    ``http``: :func:`head_deadline_protocol`, which closes connections that send no complete
    request head within ``header_timeout`` seconds. ``limit_concurrency``: the app's upload,
    model and queue places plus :data:`CONNECTION_HEADROOM`; past it uvicorn answers 503 at
    once instead of accepting connections until the process runs out of file descriptors.

    Raises:
        UserError: ``header_timeout`` not positive.
    """
    if not header_timeout > 0 or not math.isfinite(header_timeout):
        raise UserError(f"header_timeout={header_timeout} must be a positive number of "
                        "seconds (bcd serve --header-timeout).")
    gate: Gate = app.state.gate
    connections = gate.max_uploads + gate.concurrency + gate.max_queue + CONNECTION_HEADROOM
    return {"http": head_deadline_protocol(float(header_timeout)),
            "limit_concurrency": connections}

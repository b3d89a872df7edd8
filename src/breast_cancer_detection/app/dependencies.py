"""What the routes reach through ``Depends``: the parts of the app they answer for, which
:func:`~.server.create_app` puts in ``app.state``."""

from __future__ import annotations

from fastapi import Request

from .gate import Gate
from .service import Service
from .slides import Slides


async def service_of(request: Request) -> Service:
    """The app's :class:`~.service.Service`: the loaded model and the work of a request."""
    return request.app.state.service


async def gate_of(request: Request) -> Gate:
    """The app's :class:`~.gate.Gate`: its admission counts."""
    return request.app.state.gate


async def slides_of(request: Request) -> Slides | None:
    """The ``bcd slide`` results the app shows, or None (started without ``--slides``)."""
    return request.app.state.slides

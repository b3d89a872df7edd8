"""The web app: a FastAPI service and one static page; it holds no model logic.

``bcd serve CKPT`` runs it; :func:`create_app` builds it for tests and other servers. The
names load on first use, so that reading :class:`~.limits.ServeLimits` (``bcd --help``) needs
neither FastAPI nor torch.

Its modules, from the door inwards: :mod:`.server` (create_app: the wiring), :mod:`.security`
(Host check, cross-site check, headers), :mod:`.connections` (uvicorn's request-head deadline),
:mod:`.routes_predict`, :mod:`.routes_slides` and :mod:`.fallback` (the API's routers, which
reach the parts below through :mod:`.dependencies`), :mod:`.gate` (admission),
:mod:`.uploads` (multipart reading), :mod:`.service` (decode, cost, predict, explain),
:mod:`.card` (the model card), :mod:`.slides` (the ``bcd slide`` results), :mod:`.schemas`,
:mod:`.refusals` and :mod:`.limits` (every limit of ``bcd serve``).
"""

from __future__ import annotations

import importlib

_EXPORTS = {"create_app": "server", "model_card": "server", "ServeLimits": "limits"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

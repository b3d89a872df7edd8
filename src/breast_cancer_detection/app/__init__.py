"""The web app: a FastAPI service and one static page; it holds no model logic.

``bcd serve CKPT`` runs it; :func:`create_app` builds it for tests and other servers.
"""

from __future__ import annotations

from .server import create_app, model_card

__all__ = ["create_app", "model_card"]

"""What one `bcd serve` instance allows: every limit in one place, with no FastAPI import, so
that the CLI's defaults and help text read the same values the server applies."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ServeLimits:
    """The limits of one server; ``ServeLimits()`` holds the defaults of ``bcd serve``."""

    max_upload_mb: float = 20.0
    """Largest request body, in MiB (413 beyond)."""

    max_concurrency: int = 1
    """Requests processed at once."""

    max_queue: int = 8
    """Requests allowed to wait for a model slot (503 with Retry-After beyond)."""

    max_request_megapixels: float = 50.0
    """Pixels one request may make the server hold, in millions: each image decoded, plus the
    whole-image view resized for the model and Grad-CAM. Eight 700x460 BreakHis images and four
    2000x2000 ones come to about 20 MP; one 1-bit 10,000x10,000 PNG (12 KB sent) to 100 MP."""

    max_request_tiles: int = 2000
    """Model passes one request may need for its tiled images, counted as passes over
    :data:`TILE_UNIT` px squares: a model of smaller tiles does less work a tile, and its tiles
    count in proportion to their area (the bundled model's 96 px tiles count 0.18 each). At the
    project's 256 px tiles a 2000x2000 image is 225 tiles and a 5000x5000 one 1,521; with the
    bundled model a 2500x2500 image is 2,704 tiles of 96 px, 497 by this count."""

    upload_timeout: float = 30.0
    """Seconds a client has to send its whole request body (408 beyond)."""

    header_timeout: float = 10.0
    """Seconds a connection has to send a complete request head, from when it opens or from
    the end of the previous answer (closed beyond). Uvicorn's own keep-alive timer stops at the
    first byte, so a client that sends nothing, or one header line a second, would keep its
    socket for ever."""

    max_uploads: int = 32
    """Requests that may be sending their body at once (503 beyond). They hold no model slot
    and no queue place; Starlette spools each file over 1 MB to disk meanwhile, so they cost
    little memory."""

    @classmethod
    def names(cls) -> list[str]:
        """The field names, which are also the ``bcd serve`` options (``--max-upload-mb``...)."""
        return [f.name for f in fields(cls)]


TILE_UNIT = 224
"""The side of the square a tile of :attr:`ServeLimits.max_request_tiles` stands for."""

MAX_FILES = 32
"""Files accepted in one request."""

CONNECTION_HEADROOM = 16
"""Connections allowed beyond ``max_uploads + max_concurrency + max_queue``: the page, its
files, /api/health, /api/slides. Past the total, uvicorn answers 503 at once."""

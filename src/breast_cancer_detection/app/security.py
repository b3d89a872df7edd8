"""Security at the door: the Host check against DNS rebinding, the cross-site upload check,
and the headers every answer carries (CSP, nosniff, no-referrer, no-store for the API)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders

LOCAL_NAMES = ("localhost",)
"""Host names answered to besides IP addresses and ``allowed_hosts``."""

# The page loads nothing from elsewhere; the browser enforces it. /docs is left out: FastAPI's
# Swagger UI loads its script from a CDN.
_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
"""Methods that change nothing: the cross-site check spares them."""


def _host_name(host: str) -> str:
    """The name or address of a Host header, without port, brackets or trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Guard:
    """Refuses Host headers the server does not answer to (or none), and uploads sent by other
    sites' pages (:meth:`_cross_site`); adds the security headers.

    DNS rebinding: a web page at evil.example can point its name at 127.0.0.1 and read this
    server from the victim's browser, which sends ``Host: evil.example``. A Host that is an
    IP address cannot be rebound (the page would have to come from that address), so IP
    addresses, ``localhost`` and the names given are answered; anything else gets 400.
    A plain ASGI middleware, not Starlette's BaseHTTPMiddleware, so that the endpoint's
    ``receive`` still reports a client that disconnects.
    """

    def __init__(self, app, allowed_hosts: Iterable[str]):
        self.app = app
        names = {_host_name(h) for h in allowed_hosts}
        self.any_host = "*" in names
        self.names = names | set(LOCAL_NAMES)

    def allows(self, host: str) -> bool:
        name = _host_name(host)
        return self.any_host or name in self.names or _is_ip(name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                # Image names and answers must not leak to other sites through links.
                headers.setdefault("Referrer-Policy", "no-referrer")
                if path.startswith("/api/"):
                    # Predictions are about someone's tissue: no copy in any cache.
                    headers["Cache-Control"] = "no-store"
                if not path.startswith(("/docs", "/redoc")):
                    headers.setdefault("Content-Security-Policy", _CSP)
            await send(message)

        headers = {k: v.decode("latin-1") for k, v in scope.get("headers", [])
                   if k in (b"host", b"origin", b"sec-fetch-site")}
        host = headers.get(b"host", "")
        refusal = None
        if not _host_name(host):
            refusal = JSONResponse({"detail": (
                "the request has no Host header: send one naming this server, as browsers "
                "and HTTP clients do (Host: 127.0.0.1:8000, for one).")}, 400)
        elif not self.allows(host):
            name = _host_name(host)
            refusal = JSONResponse({"detail": (
                f"the Host header {name!r} is not a name this server answers to (it answers "
                "to IP addresses, localhost and the names given with --allowed-hosts; a guard "
                "against DNS rebinding). If that name is this machine's, start it with "
                f"`bcd serve ... --allowed-hosts {name}` (comma-separated; '*' turns the "
                "check off).")}, 400)
        elif scope.get("method") not in _SAFE_METHODS:
            refusal = self._cross_site(f"{scope.get('scheme', 'http')}://{host}/",
                                       host, headers.get(b"origin"),
                                       headers.get(b"sec-fetch-site"))
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def _cross_site(self, page: str, host: str, origin: str | None, fetch_site: str | None
                    ) -> JSONResponse | None:
        """403 for a request that changes something (an upload) sent by another site's page.

        A page elsewhere can make the visitor's browser post a form here (it cannot read the
        answer, but the upload costs model time, and it can probe the server). Browsers say
        where such a request comes from: ``Sec-Fetch-Site: cross-site``, and an ``Origin``
        whose host is not this one. An Origin is accepted when its host is the Host header's
        (the page itself) or one of ``allowed_hosts`` (a proxy in front that rewrites Host);
        clients other than browsers send neither header.
        """
        if (fetch_site or "").strip().lower() == "cross-site":
            return JSONResponse({"detail": (
                "cross-site request refused: the browser says it comes from another site's "
                f"page, and this server takes uploads only from its own; open {page} and "
                "upload there.")}, 403)
        if origin is None:
            return None
        netloc = urlsplit(origin.strip()).netloc if origin.strip() != "null" else ""
        name = _host_name(netloc.rpartition("@")[2])
        if name and (self.any_host or name == _host_name(host)
                     or name in self.names - set(LOCAL_NAMES)):
            return None
        proxy = (f" If {name} is this server's own name (behind a proxy), start it with "
                 f"`bcd serve ... --allowed-hosts {name}`." if name else "")
        return JSONResponse({"detail": (
            f"cross-site request refused: it comes from the page of {origin.strip()!r}, and "
            f"this server takes uploads only from its own page; open {page} and upload "
            f"there.{proxy}")}, 403)

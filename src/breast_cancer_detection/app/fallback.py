"""The API's fallback: an unknown /api path, or a known one asked with the wrong method, is
answered in JSON that lists the API."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute


def fallback_router(*routers: APIRouter) -> APIRouter:
    """Answers an unknown /api path, or a known one asked with the wrong method, in JSON that
    lists the API of ``routers`` (the page's mount at / would otherwise answer a bare "Not
    Found"). Included after them."""
    api = [r for router in routers for r in router.routes
           if isinstance(r, APIRoute) and r.path.startswith("/api/")]
    listing = ", ".join(f"{sorted(r.methods)[0]} {r.path}" for r in api)
    fallback = APIRouter()

    @fallback.api_route("/api/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH",
                                                      "DELETE", "OPTIONS"],
                        include_in_schema=False)
    async def api_fallback(request: Request, rest: str) -> JSONResponse:
        allowed = sorted({m for r in api if r.path_regex.match(request.url.path)
                          for m in r.methods})
        if allowed:
            return JSONResponse({"detail": f"{request.method} is not answered at "
                                           f"{request.url.path}: use {' or '.join(allowed)}."},
                                405, headers={"Allow": ", ".join(allowed)})
        return JSONResponse({"detail": f"no API at {request.url.path}; the API is: {listing} "
                                       "(schema at /openapi.json)."}, 404)

    return fallback

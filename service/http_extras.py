"""Plain routes that BentoML's API decorator does not offer, as a small Starlette app at /adapters."""

from __future__ import annotations

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.registry import SERVED


def _listing() -> dict:
    return {
        "base": SERVED.base_tag,
        "adapters": SERVED.adapter_rows(),
        "refused": SERVED.refused_adapters,
    }


async def adapters(request: Request) -> JSONResponse:
    if not SERVED.ready:
        return JSONResponse({"error": "models are still loading"}, status_code=503)
    return JSONResponse(_listing())


async def reload(request: Request) -> JSONResponse:
    """Admin: re-read the store (new adapters, new versions) without a restart."""
    if not SERVED.ready:
        return JSONResponse({"error": "models are still loading"}, status_code=503)
    await anyio.to_thread.run_sync(SERVED.reload_adapters)
    return JSONResponse(_listing())


extras = Starlette(
    routes=[Route("/", adapters, methods=["GET"]), Route("/reload", reload, methods=["POST"])]
)

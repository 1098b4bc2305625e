"""Plain routes that BentoML's API decorator does not offer, as a small Starlette app at /adapters."""

from __future__ import annotations

from collections.abc import Callable

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.state import ServedSnapshot, ServerState

LOADING = {"error": "models are still loading"}


def adapter_routes(state: ServerState, reload: Callable[[], ServedSnapshot]) -> Starlette:
    """GET / lists what `state` serves; POST /reload (admin) calls `reload`, which re-reads the
    store (new adapters, new versions) without a restart, and lists what it published."""

    async def adapters(request: Request) -> JSONResponse:
        snapshot = state.snapshot
        if not snapshot.loaded:
            return JSONResponse(LOADING, status_code=503)
        return JSONResponse(snapshot.listing())

    async def reload_adapters(request: Request) -> JSONResponse:
        if not state.snapshot.loaded:
            return JSONResponse(LOADING, status_code=503)
        snapshot = await anyio.to_thread.run_sync(reload)
        return JSONResponse(snapshot.listing())

    return Starlette(
        routes=[
            Route("/", adapters, methods=["GET"]),
            Route("/reload", reload_adapters, methods=["POST"]),
        ]
    )

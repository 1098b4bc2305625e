"""Plain routes that BentoML's API decorator does not offer, as a small Starlette app at /adapters."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.admin_routes import LOADING, admin_routes
from service.state import ServerState

if TYPE_CHECKING:
    from service.store_watcher import StoreWatcher


def adapter_routes(state: ServerState, watcher: Callable[[], StoreWatcher]) -> Starlette:
    """GET / lists what `state` serves; POST /reload (admin) re-reads the store through the
    running instance's store watcher (new adapters, new versions, the deny list) without a
    restart, and lists what it published; the admin routes of service.admin_routes."""

    async def adapters(request: Request) -> JSONResponse:
        snapshot = state.snapshot
        if not snapshot.loaded:
            return JSONResponse(LOADING, status_code=503)
        return JSONResponse(snapshot.listing(state.live.adapter_tiers))

    async def reload_adapters(request: Request) -> JSONResponse:
        if not state.snapshot.loaded:
            return JSONResponse(LOADING, status_code=503)
        snapshot = await anyio.to_thread.run_sync(watcher().reload)
        return JSONResponse(snapshot.listing())

    return Starlette(
        routes=[
            Route("/", adapters, methods=["GET"]),
            Route("/reload", reload_adapters, methods=["POST"]),
            *admin_routes(state, watcher),
        ]
    )

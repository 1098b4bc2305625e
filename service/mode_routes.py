"""`GET /controlnets/`: the ControlNets in the store (as /controlnet names them) and the refiner
this server serves, beside `GET /adapters/` (the bearer token guards it as every API route)."""

from __future__ import annotations

from collections.abc import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


def controlnet_routes(refiner: Callable[[], str]) -> Starlette:
    """`refiner()`: the store tag BENTOLORA_REFINER names ('' for none)."""

    async def listing(request: Request) -> JSONResponse:
        import anyio.to_thread

        return JSONResponse(await anyio.to_thread.run_sync(_listing, refiner()))

    return Starlette(routes=[Route("/", listing, methods=["GET"])])


def _listing(refiner: str) -> dict:
    from models.controlnets import KIND, PREFIX
    from models.store import list_entries

    newest: dict[str, dict] = {}
    for entry in list_entries(KIND):  # newest first
        name = entry.name.removeprefix(PREFIX)
        if name in newest:
            continue
        newest[name] = {
            "name": name,
            "version": entry.version,
            "source": entry.metadata.get("source", ""),
            "content_hash": entry.metadata.get("content_hash", ""),
        }
    return {"controlnets": [newest[n] for n in sorted(newest)], "refiner": refiner or None}

"""Plain GET routes that BentoML's API decorator does not offer, as a small Starlette app."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.registry import SERVED


async def adapters(request: Request) -> JSONResponse:
    if not SERVED.ready:
        return JSONResponse({"error": "models are still loading"}, status_code=503)
    return JSONResponse({"base": SERVED.base_tag, "adapters": SERVED.adapter_rows()})


extras = Starlette(routes=[Route("/", adapters, methods=["GET"])])

"""The order of the gates in front of the API, outermost first: refuse pickle and oversized
bodies; answer CORS (when configured, so preflights need no token); check the bearer token;
admit into the bounded queue."""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware

from service.admission import Admission
from service.auth import BearerAuth
from service.request_guard import RequestGuard
from service.settings import Settings


def install_middleware(service, settings: Settings) -> None:
    service.add_asgi_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes)
    if settings.allowed_origins():
        service.add_asgi_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins(),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    service.add_asgi_middleware(
        BearerAuth, token=settings.bearer_token(), admin_token=settings.bearer_admin_token()
    )
    service.add_asgi_middleware(Admission, max_queue=settings.max_queue)

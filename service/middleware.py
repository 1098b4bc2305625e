"""The order of the gates in front of the API, outermost first: answer 503 while draining, refuse
pickle, repeated Content-Types and oversized bodies (an adapter upload's cap is the adapter
size cap); answer CORS (when configured, so preflights need no token); check the bearer token;
read the whole body within BENTOLORA_BODY_TIMEOUT_S (so a slow client holds no work slot); admit
into the bounded queue; decode /score images in worker threads (so BentoML's validation, on the
event loop, finds them decoded).

BentoML's own gates are outside all of these: its HTTP metrics (labelled by route) and request
timeout (both repaired in service.bentoml_fixes), and its concurrency cap."""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware

from service.admin_routes import UPLOAD_PATH, upload_body_limit
from service.admission import Admission, RequestLimits
from service.auth import BearerAuth
from service.drain import Drain
from service.predecode import DecodeScoreImages
from service.request_guard import RequestGuard, WholeBody
from service.settings import Settings
from service.state import ServerState


def install_middleware(service, settings: Settings, state: ServerState, drain: Drain) -> None:
    service.add_asgi_middleware(
        RequestGuard,
        max_body_bytes=settings.max_body_bytes,
        drain=drain,
        path_limits={UPLOAD_PATH: upload_body_limit(settings)},
    )
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
    service.add_asgi_middleware(WholeBody, timeout_s=settings.body_timeout_s)
    service.add_asgi_middleware(
        Admission,
        max_queue=settings.max_queue,
        live=state.live,
        limits=RequestLimits.from_settings(settings),
    )
    service.add_asgi_middleware(
        DecodeScoreImages,
        max_bytes=settings.max_input_bytes,
        max_pixels=settings.max_input_pixels,
    )

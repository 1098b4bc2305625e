"""Bearer-token authentication: one token for clients, a separate one for admin routes.

Health and metrics stay open (orchestrators and Prometheus probe them without secrets). With no
client token configured the API is open; admin routes are disabled until an admin token is set.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from service.request_guard import refuse

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
UI_PREFIX = "/ui"
UNUSED_UI_ROUTES = (
    "/ui/gradio_api/upload",
    "/ui/gradio_api/proxy=",
    "/ui/gradio_api/vibe",
    "/ui/gradio_api/undo-vibe",
    "/ui/gradio_api/dev/",
    "/ui/gradio_api/process_recording",
    "/ui/gradio_api/file=",
    "/ui/gradio_api/file/",
    "/ui/gradio_api/deep_link",
    "/ui/gradio_api/run-history",
    "/ui/monitoring",
)
"""Gradio routes this UI has no use for (it takes no uploads, proxies nothing, runs no editor,
serves no files: its images travel inside the answers; keeps no deep links or run history):
answered 404 before Gradio sees them, so the open /ui prefix does not open them."""
"""The web UI's page and Gradio's own routes: open, since the UI asks for the token and sends it
with each call it makes to the API (see service/ui.py)."""
ADMIN_PATHS = frozenset(
    {
        "/adapters/reload",
        "/adapters/upload",
        "/adapters/unload",
        "/adapters/deny",
        "/adapters/allow",
    }
)
"""Routes that take the admin token (service.http_extras, service.admin_routes)."""


def _matches(given: str, expected: str) -> bool:
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path == UI_PREFIX or path.startswith(UI_PREFIX + "/")


class BearerAuth:
    def __init__(self, app: ASGIApp, token: str, admin_token: str):
        self.app = app
        self.token = token
        self.admin_token = admin_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(UNUSED_UI_ROUTES):
            return await refuse(scope, receive, send, 404, "not served")
        if scope["type"] != "http" or _open(scope["path"]):
            return await self.app(scope, receive, send)
        given = ""
        for key, value in scope["headers"]:
            if key.lower() == b"authorization":
                scheme, _, credentials = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    given = credentials.strip()
        challenge = {"WWW-Authenticate": 'Bearer realm="bentolora"'}
        if scope["path"].rstrip("/") in ADMIN_PATHS:
            if not self.admin_token:
                return await refuse(
                    scope, receive, send, 403, "admin routes are off: set BENTOLORA_ADMIN_TOKEN"
                )
            if not _matches(given, self.admin_token):
                status = 403 if _matches(given, self.token) else 401
                return await refuse(
                    scope, receive, send, status, "this route needs the admin token", challenge
                )
            return await self.app(scope, receive, send)
        if self.token and not (_matches(given, self.token) or _matches(given, self.admin_token)):
            why = "wrong bearer token" if given else "missing bearer token (Authorization header)"
            return await refuse(scope, receive, send, 401, why, challenge)
        return await self.app(scope, receive, send)

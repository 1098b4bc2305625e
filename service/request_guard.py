"""The gates on a request's headers and body, before any parser or work slot sees it.

`RequestGuard`, first gate of every request: while the server drains (after SIGTERM) it answers
503 at once; no pickle bodies (any path, any port this app serves); exactly one Content-Type,
and JSON only on the API endpoints (BentoML picks its parser from the first Content-Type header:
a second one must not pick another parser than the one checked here); no body over the size
cap (`max_body_bytes`, or a path's own in `path_limits`: an adapter upload's is the adapter size
cap), counted as it streams in so a missing Content-Length does not help.

`WholeBody`, the last gate before admission (after the token check): reads the whole body within
`BENTOLORA_BODY_TIMEOUT_S`, so a client that sends part of a body and goes idle never holds a
work slot, and is answered 408 and cut off when its time is up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.drain import Drain

JSON_PATHS = frozenset(
    {
        "/generate",
        "/score",
        "/img2img",
        "/inpaint",
        "/controlnet",
        "/generate_with_refiner",
        "/refine",
        "/job/submit",
    }
)


class RequestGuard:
    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        drain: Drain | None = None,
        path_limits: Mapping[str, int] | None = None,
    ):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.drain = drain or Drain()
        self.path_limits = dict(path_limits or {})

    def limit(self, path: str) -> int:
        """The body size cap of `path`."""
        return self.path_limits.get(path.rstrip("/"), self.max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.refusal(scope)
        if refusal is not None:
            return await refuse(scope, receive, send, *refusal)
        limit = self.limit(scope["path"])
        length = _header(scope, b"content-length")
        if length.isdigit() and int(length) > limit:
            return await _too_large(scope, receive, send, limit)

        counted_receive, tracked_send = self._capped(scope, receive, send, limit)
        with self.drain.tracking(scope["path"]):
            await self.app(scope, counted_receive, tracked_send)

    def _capped(
        self, scope: Scope, receive: Receive, send: Send, limit: int
    ) -> tuple[Receive, Send]:
        """`receive` counting the body as it streams in, and `send` that stays quiet once the body
        went over the cap and was answered 413."""
        seen = 0
        started = refused = False

        async def counted_receive() -> Message:
            # Past the cap: answer 413 now and tell the app the client left, so it stops reading
            # (an exception here would reach BentoML's handler and come out as a 500).
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = True
                    if not started:
                        await _too_large(scope, receive, send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 is already sent; whatever the app answers goes nowhere
            started = started or message["type"] == "http.response.start"
            await send(message)

        return counted_receive, tracked_send

    def refusal(self, scope: Scope) -> tuple[int, str, dict[str, str]] | None:
        """(status, message, headers) when the request's headers alone refuse it, else None."""
        if self.drain.draining and not self.drain.serves_while_draining(scope["path"]):
            return (
                503,
                "the server is shutting down; send this to another instance",
                {"Retry-After": "1", "Connection": "close"},
            )
        content_types = [
            v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"content-type"
        ]
        if len(content_types) > 1:
            return (
                400,
                f"{len(content_types)} Content-Type headers ({', '.join(content_types)}); "
                "send exactly one",
                {"Connection": "close"},
            )
        media_type = content_types[0].lower() if content_types else ""
        if "pickle" in media_type:
            return 415, f"{media_type} bodies are refused; send JSON", {}
        base_type = media_type.split(";")[0].strip()
        if scope["path"].rstrip("/") in JSON_PATHS and base_type not in ("", "application/json"):
            return 415, f"{base_type} bodies are refused; send application/json", {}
        return None


class WholeBody:
    """Reads the request body to its end before the next gate (admission) sees the request, within
    `timeout_s` from the request's headers; past it the answer is 408 and the connection closes.
    The app then reads the same body, from memory (the size cap is RequestGuard's, upstream)."""

    def __init__(self, app: ASGIApp, timeout_s: float):
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        # the client left (or the size cap cut it off, answered 413 already)
                        return await client_closed(send)
                    chunks.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return await refuse(
                scope,
                receive,
                send,
                408,
                f"the request body was not complete within {self.timeout_s:g} s "
                "(BENTOLORA_BODY_TIMEOUT_S)",
                {"Connection": "close"},
            )
        body = b"".join(chunks)
        chunks.clear()
        await self.app(scope, replay_body(body, then=receive), send)


def replay_body(body: bytes, then: Receive) -> Receive:
    """The `receive` of an app behind a gate that read the body already: the body as one message
    (then let go of), after it whatever `then` gives (the client's disconnect, when it comes)."""
    delivered = False

    async def receive() -> Message:
        nonlocal delivered, body
        if not delivered:
            delivered = True
            message, body = {"type": "http.request", "body": body, "more_body": False}, b""
            return message
        return await then()

    return receive


async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    await refuse(scope, receive, send, 413, f"request body is over {limit} bytes")


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    return (length != "" and length != "0") or bool(_header(scope, b"transfer-encoding"))


async def client_closed(send: Send) -> None:
    """Answer a request whose client has gone with 499 (nginx's "client closed request"):
    nobody reads it, but the access log then says what happened, not a 500 or nothing."""
    await send({"type": "http.response.start", "status": 499, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def refuse(
    scope: Scope, receive: Receive, send: Send, status: int, message: str, headers=None
) -> None:
    await JSONResponse({"error": message}, status_code=status, headers=headers)(
        scope, receive, send
    )

"""First gate of every request: no pickle bodies (any path, any port this app serves), JSON only
on the API endpoints, and no body over the size cap, counted as it streams in so a missing
Content-Length does not help."""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

JSON_PATHS = frozenset({"/generate", "/score"})


class RequestGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        media_type = headers.get("content-type", "").lower()
        if "pickle" in media_type:
            return await refuse(
                scope, receive, send, 415, f"{media_type} bodies are refused; send JSON"
            )
        base_type = media_type.split(";")[0].strip()
        if scope["path"].rstrip("/") in JSON_PATHS and base_type not in ("", "application/json"):
            return await refuse(
                scope, receive, send, 415, f"{base_type} bodies are refused; send application/json"
            )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await self._too_large(scope, receive, send)

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
                if seen > self.max_body_bytes:
                    refused = True
                    if not started:
                        await self._too_large(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 is already sent; whatever the app answers goes nowhere
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted_receive, tracked_send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await refuse(scope, receive, send, 413, f"request body is over {self.max_body_bytes} bytes")


async def refuse(
    scope: Scope, receive: Receive, send: Send, status: int, message: str, headers=None
) -> None:
    await JSONResponse({"error": message}, status_code=status, headers=headers)(
        scope, receive, send
    )

"""Admission control: a bounded queue per endpoint, so overload is refused at once, not queued
until every request times out.

A request to /generate or /score counts from arrival until its response is sent. Past
`max_queue` per endpoint the answer is 429 with `Retry-After` (the seconds the queue ahead needs,
from recent batch times), computed without touching the model. A server whose GPU failed answers
503 at once (the orchestrator restarts it on the failing /livez).
"""

from __future__ import annotations

import math
from collections import Counter

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.registry import SERVED
from service.request_guard import refuse

QUEUED_PATHS = frozenset({"/generate", "/score"})


class Admission:
    def __init__(self, app: ASGIApp, max_queue: int):
        self.app = app
        self.max_queue = max_queue
        self.in_flight: Counter[str] = Counter()

    def retry_after_s(self, path: str) -> int:
        """Seconds until the queue ahead has likely drained enough to take one more."""
        per_request = SERVED.seconds_per_request.get(path, 1.0)
        return max(1, math.ceil(self.in_flight[path] * per_request))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "").rstrip("/")
        if scope["type"] != "http" or scope["method"] != "POST" or path not in QUEUED_PATHS:
            return await self.app(scope, receive, send)
        if SERVED.broken:
            return await refuse(
                scope, receive, send, 503, f"the GPU failed ({SERVED.broken}); restarting"
            )
        if self.in_flight[path] >= self.max_queue:
            metrics.refused(path)
            wait = self.retry_after_s(path)
            return await refuse(
                scope,
                receive,
                send,
                429,
                f"{path} has {self.in_flight[path]} requests queued (limit {self.max_queue}); "
                f"retry in {wait} s",
                {"Retry-After": str(wait)},
            )
        self.in_flight[path] += 1
        metrics.queue_depth(path, self.in_flight[path])
        try:
            await self.app(scope, receive, _explain_503(scope, receive, send))
        finally:
            self.in_flight[path] -= 1
            metrics.queue_depth(path, self.in_flight[path])


def _explain_503(scope: Scope, receive: Receive, send: Send) -> Send:
    """BentoML answers every 5xx with a generic text; a 503 the engine raised (out of memory,
    failed GPU) gets the engine's reason instead, and a Retry-After, so a client knows what to do."""
    held = False

    async def wrapped(message: Message) -> None:
        nonlocal held
        if message["type"] == "http.response.start" and message["status"] == 503:
            held = True
            return
        if held and message["type"] == "http.response.body" and not message.get("more_body"):
            reason = SERVED.recent_unavailable_reason() or "the server cannot take this now"
            await refuse(scope, receive, send, 503, reason, {"Retry-After": "1"})
            return
        if not held:
            await send(message)

    return wrapped

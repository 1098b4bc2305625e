"""Admission control: what a request costs is counted before it may wait for the GPU, so
overload is refused at once instead of queued until every request times out.

The body (read whole by request_guard.WholeBody, upstream) is measured before any parser sees
it: its items (entries of `requests`), its images (generated, or sent to /score) and, for
/generate, its work: denoising steps of a 1024² image (an image of w×h pixels at s steps counts
s × w × h / 1024²). A request over BENTOLORA_MAX_REQUEST_ITEMS or _IMAGES, or with more work
than the whole queue may hold, is answered 400 naming the cap. A request is admitted while its
endpoint has fewer than `max_queue` requests in flight and, for /generate, while the work in
flight plus its own stays within BENTOLORA_MAX_QUEUE_WORK; otherwise 429 with `Retry-After` (the
seconds the queue ahead needs, from recent batch times), computed without touching the model. A
server whose GPU failed answers 503 at once (the orchestrator restarts it on the failing /livez).

An admitted request counts from then until its response is sent. Its scope carries an
asyncio.Event (`batcher.CLIENT_GONE`) set when its client disconnects, so work for a client
that has gone is dropped before it starts (service.batcher).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import anyio.to_thread
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.batcher import CLIENT_GONE
from service.request_guard import refuse, replay_body
from service.settings import Settings
from service.state import LiveStatus

log = logging.getLogger(__name__)

IMAGE_MODE_PATHS = frozenset({"/img2img", "/inpaint", "/refine"})
"""Endpoints that denoise from a client's image (service.image_modes)."""
TEXT_TO_IMAGE_PATHS = frozenset({"/generate", "/controlnet", "/generate_with_refiner"})
"""Endpoints whose work is measured as /generate's."""
QUEUED_PATHS = frozenset({"/score"}) | TEXT_TO_IMAGE_PATHS | IMAGE_MODE_PATHS
WORK_PATHS = TEXT_TO_IMAGE_PATHS | IMAGE_MODE_PATHS
"""Endpoints whose work is counted (a /score is bounded by its images)."""
WORK_UNIT_PIXELS = 1024 * 1024
PARSE_IN_THREAD_BYTES = 1 << 20
"""Bodies larger than this are measured in a worker thread, off the event loop."""


@dataclass(frozen=True)
class RequestLimits:
    max_items: int = Settings.max_request_items
    max_images: int = Settings.max_request_images
    max_work: float = Settings.max_queue_work

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLimits:
        return cls(
            max_items=settings.max_request_items,
            max_images=settings.max_request_images,
            max_work=settings.max_queue_work,
        )


@dataclass(frozen=True)
class Demand:
    """What one request asks for: entries, images and (for /generate) work in 1024² image-steps."""

    items: int = 0
    images: int = 0
    work: float = 0.0


def _field(entry: Mapping, name: str, default: int, low: int, high: int) -> int:
    """An integer field of a request entry as validation will see it, clamped to its limits;
    the default for a value validation will refuse anyway (it answers 400 for it)."""
    value = entry.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        return default
    return min(max(value, low), high)


def measure(path: str, body: bytes) -> Demand:
    """The demand of a /generate or /score body; an empty one when the body is not that shape
    (BentoML's validation answers it with 400)."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return Demand()
    entries = parsed.get("requests") if isinstance(parsed, dict) else None
    if not isinstance(entries, list):
        return Demand()
    entries = [e if isinstance(e, dict) else {} for e in entries]
    if path == "/score":
        images = sum(len(e["images"]) for e in entries if isinstance(e.get("images"), list))
        return Demand(items=len(entries), images=images)
    images = work = 0
    for entry in entries:
        count = _field(entry, "num_images", 1, 1, 8)
        if path in IMAGE_MODE_PATHS:
            steps, pixels = _image_mode_work(entry)
        else:
            steps = _field(entry, "steps", 30, 1, 150)
            pixels = _field(entry, "width", 1024, 64, 4096) * _field(
                entry, "height", 1024, 64, 4096
            )
        images += count
        work += count * steps * pixels / WORK_UNIT_PIXELS
    return Demand(items=len(entries), images=images, work=work)


def _image_mode_work(entry: Mapping) -> tuple[float, int]:
    """Denoising steps and pixels of an /img2img or /inpaint entry: int(steps × strength) steps
    (at least one: the VAE round trip of strength 0 costs about a step), of the init image's
    size (read from its header; width and height, when sent, must equal it)."""
    from service.images import ImageInputError, check
    from service.schemas import DEFAULT_STRENGTH

    steps = _field(entry, "steps", 30, 1, 150)
    default = 1.0 if "mask" in entry else DEFAULT_STRENGTH
    strength = entry.get("strength", default)
    if not isinstance(strength, int | float) or not 0 <= strength <= 1:
        strength = default  # validation answers it with 400
    width, height = entry.get("width"), entry.get("height")
    image = entry.get("image")
    if not (isinstance(width, int) and isinstance(height, int)) and isinstance(image, str):
        with contextlib.suppress(ImageInputError):
            found = check(image, max_bytes=len(image), max_pixels=4096 * 4096)
            width, height = found.width, found.height
    pixels = _field({"w": width}, "w", 1024, 64, 4096) * _field({"h": height}, "h", 1024, 64, 4096)
    return max(1, int(steps * strength)), pixels


def over_cap(demand: Demand, limits: RequestLimits) -> str:
    """Why a request can never be admitted (the 400's message), or ''."""
    if demand.items > limits.max_items:
        return (
            f"requests: {demand.items} entries; this server takes at most {limits.max_items} in "
            "one request (BENTOLORA_MAX_REQUEST_ITEMS): send them as several requests"
        )
    if demand.images > limits.max_images:
        return (
            f"requests: {demand.images} images in all; this server takes at most "
            f"{limits.max_images} in one request (BENTOLORA_MAX_REQUEST_IMAGES): send them as "
            "several requests"
        )
    if demand.work > limits.max_work:
        return (
            f"requests: {demand.work:.3g} units of work (denoising steps of a 1024² image: "
            f"num_images × steps × width × height / 1024²); the whole queue holds "
            f"{limits.max_work:g} (BENTOLORA_MAX_QUEUE_WORK): ask for fewer images, steps or "
            "pixels, or split the request"
        )
    return ""


class Admission:
    def __init__(
        self,
        app: ASGIApp,
        max_queue: int,
        live: LiveStatus,
        limits: RequestLimits | None = None,
    ):
        self.app = app
        self.max_queue = max_queue
        self.live = live
        self.limits = limits or RequestLimits()
        self.in_flight: Counter[str] = Counter()
        self.work: Counter[str] = Counter()
        """Work admitted and not yet answered, per endpoint (1024² image-steps)."""

    def retry_after_s(self, path: str) -> int:
        """Seconds until the queue ahead has likely drained enough to take one more."""
        per_request = self.live.seconds_per_request.get(path, 1.0)
        return max(1, math.ceil(self.in_flight[path] * per_request))

    def queue_full(self, path: str, demand: Demand) -> str:
        """Why `demand` must wait (the 429's message), or '' when it may be admitted now."""
        if self.in_flight[path] >= self.max_queue:
            return f"{path} has {self.in_flight[path]} requests queued (limit {self.max_queue})"
        if path in WORK_PATHS and self.work[path] + demand.work > self.limits.max_work:
            return (
                f"{path} has {self.work[path]:.3g} units of work queued and this request is "
                f"{demand.work:.3g} (limit {self.limits.max_work:g}, BENTOLORA_MAX_QUEUE_WORK)"
            )
        return ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "").rstrip("/")
        if scope["type"] != "http" or scope["method"] != "POST" or path not in QUEUED_PATHS:
            return await self.app(scope, receive, send)
        if self.live.broken:
            return await refuse(
                scope, receive, send, 503, f"the GPU failed ({self.live.broken}); restarting"
            )
        body = await _read_body(receive)
        if body is None:
            log.info("%s: the client disconnected before its request body was complete", path)
            return
        if len(body) > PARSE_IN_THREAD_BYTES:
            demand = await anyio.to_thread.run_sync(measure, path, body)
        else:
            demand = measure(path, body)
        problem = over_cap(demand, self.limits)
        if problem:
            return await refuse(scope, receive, send, 400, problem)
        full = self.queue_full(path, demand)
        if full:
            metrics.refused(path)
            wait = self.retry_after_s(path)
            return await refuse(
                scope,
                receive,
                send,
                429,
                f"{full}; retry in {wait} s",
                {"Retry-After": str(wait)},
            )
        await self._admitted(path, demand, body, scope, receive, send)

    async def _admitted(
        self, path: str, demand: Demand, body: bytes, scope: Scope, receive: Receive, send: Send
    ) -> None:
        self.in_flight[path] += 1
        self.work[path] += demand.work
        metrics.queue_depth(path, self.in_flight[path])
        gone = asyncio.Event()
        scope[CLIENT_GONE] = gone
        watcher = asyncio.ensure_future(_watch_disconnect(receive, gone))
        try:
            await self.app(
                scope, _replay(body, gone), _explain_503(scope, receive, send, self.live)
            )
        finally:
            watcher.cancel()
            self.in_flight[path] -= 1
            self.work[path] = max(0.0, self.work[path] - demand.work)
            metrics.queue_depth(path, self.in_flight[path])


async def _read_body(receive: Receive) -> bytes | None:
    """The request's body; None when the client disconnected first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    """After the body, the server's next message for a request is its client's disconnect (or
    the end of the response): set `gone` when it comes."""
    with contextlib.suppress(Exception):
        while (await receive())["type"] != "http.disconnect":
            pass
    gone.set()


def _replay(body: bytes, gone: asyncio.Event) -> Receive:
    """The app's `receive`: the body, read already, then the disconnect when the watcher sees it."""

    async def disconnect() -> Message:
        await gone.wait()
        return {"type": "http.disconnect"}

    return replay_body(body, then=disconnect)


def _explain_503(scope: Scope, receive: Receive, send: Send, live: LiveStatus) -> Send:
    """BentoML answers every 5xx with a generic text; a 503 the engine raised (out of memory,
    failed GPU) gets the engine's reason instead, and a Retry-After, so a client knows what to do."""
    held = False

    async def wrapped(message: Message) -> None:
        nonlocal held
        if message["type"] == "http.response.start" and message["status"] == 503:
            held = True
            return
        if held and message["type"] == "http.response.body" and not message.get("more_body"):
            reason = live.recent_unavailable_reason() or "the server cannot take this now"
            await refuse(scope, receive, send, 503, reason, {"Retry-After": "1"})
            return
        if not held:
            await send(message)

    return wrapped

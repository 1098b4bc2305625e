"""Decoding /score, /img2img, /inpaint and /controlnet images off the event loop, before BentoML
validates the request.

BentoML parses and validates a request on the server's event loop, and the /score request model
decodes its images while it validates (service/schemas.py): one request with 16 images of 4096²
kept /livez from answering for seconds. `DecodeScoreImages`, the gate after admission, reads the
body (whole already: see request_guard.WholeBody), decodes its images in worker threads (two at
a time, within service.images.DECODE_BUDGET) and puts them in `images.PREDECODED` for the rest
of the request, so the validator's `images.decode` finds each one ready (or its error) instead of
decoding it on the loop.
"""

from __future__ import annotations

import json
import threading

import anyio
import anyio.to_thread
from starlette.types import ASGIApp, Receive, Scope, Send

from service import images
from service.request_guard import replay_body

PATHS = frozenset({"/score", "/img2img", "/inpaint", "/controlnet", "/refine"})
MAX_IMAGES_PER_REQUEST = 16
"""ScoreRequest's limit: a request with more is refused by validation before any decoding, so
its images are not decoded in advance either."""
IMAGE_FIELDS = ("image", "mask")
MAX_CONTROLNETS = 3
"""ControlNetRequest's limit (service.schemas.MAX_CONTROLNETS)."""
"""Fields of /img2img and /inpaint entries holding one base64 image each."""
DECODE_THREADS = 2
"""Worker threads decoding at once, across requests (not the threads health checks use)."""

_limiter_lock = threading.Lock()
_limiter: anyio.CapacityLimiter | None = None


def _threads() -> anyio.CapacityLimiter:
    global _limiter
    with _limiter_lock:
        if _limiter is None:
            _limiter = anyio.CapacityLimiter(DECODE_THREADS)
        return _limiter


class DecodeScoreImages:
    def __init__(self, app: ASGIApp, max_bytes: int, max_pixels: int):
        self.app = app
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"].rstrip("/") not in PATHS
        ):
            return await self.app(scope, receive, send)
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        texts = await anyio.to_thread.run_sync(image_texts, body, limiter=_threads())
        decoded = await self.decode_all(texts)
        token = images.PREDECODED.set(decoded)
        try:
            await self.app(scope, replay_body(body, then=receive), send)
        finally:
            # Emptied, not only unset: anyio's idle worker threads keep a copy of the context of
            # their last call (the batch's, which holds this mapping) until their next one, and
            # 16 decoded 4096² images are 800 MB.
            decoded.clear()
            images.PREDECODED.reset(token)

    async def decode_all(self, texts: list[str]) -> dict:
        results: dict = {}

        async def one(text: str) -> None:
            key = (text, self.max_bytes, self.max_pixels)
            results[key] = await anyio.to_thread.run_sync(self._decode, text, limiter=_threads())

        async with anyio.create_task_group() as group:
            for text in dict.fromkeys(texts):  # each distinct image once
                group.start_soon(one, text)
        return results

    def _decode(self, text: str):
        try:
            checked = images.check(text, max_bytes=self.max_bytes, max_pixels=self.max_pixels)
            return images.load(checked)
        except images.ImageInputError as err:
            return err


def image_texts(body: bytes) -> list[str]:
    """The base64 images of a /score body ({"requests": [{"images": [...]}, ...]}) that
    validation would decode; nothing when the body is not that shape (validation answers)."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return []
    requests = parsed.get("requests") if isinstance(parsed, dict) else None
    texts = []
    for request in requests if isinstance(requests, list) else []:
        if not isinstance(request, dict):
            continue
        found = request.get("images")
        if isinstance(found, list) and 0 < len(found) <= MAX_IMAGES_PER_REQUEST:
            texts.extend(text for text in found if isinstance(text, str))
        # /img2img and /inpaint (service.image_modes): one init image, and a mask
        texts.extend(request[k] for k in IMAGE_FIELDS if isinstance(request.get(k), str))
        controls = request.get("controlnets")  # /controlnet: the conditioning images
        for control in controls[:MAX_CONTROLNETS] if isinstance(controls, list) else []:
            if isinstance(control, dict) and isinstance(control.get("image"), str):
                texts.append(control["image"])
    return texts

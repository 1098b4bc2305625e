"""Python client of the bentolora service, over BentoML's own HTTP clients.

    from service.client import Client
    with Client("http://localhost:3000") as client:
        images = client.generate("a red circle", width=1024, height=1024, adapters={"my-style": 0.8})
        images[0].image.save("out.png")

Timeouts are sized for SDXL on a busy GPU; only 503 (not ready / overloaded) is retried, with
backoff, since retrying any other error would repeat a failure or duplicate work.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import bentoml
from bentoml.exceptions import BentoMLException
from PIL import Image

DEFAULT_TIMEOUT_S = 600.0
RETRY_STATUS = 503


@dataclass
class Generated:
    """One generated image and how it was made."""

    image: Image.Image
    seed: int
    adapters: list[dict[str, Any]]
    settings: dict[str, Any]
    timings: dict[str, Any]
    format: str = "png"


@dataclass
class Scores:
    clip_scores: list[list[float]]
    image_similarity: list[list[float]] = field(default_factory=list)


def _request(
    prompt: str, adapters: Mapping[str, float] | Sequence[Mapping] | None, **options: Any
) -> dict:
    if isinstance(adapters, Mapping):
        adapters = [{"name": name, "scale": scale} for name, scale in adapters.items()]
    body = {"prompt": prompt, **{k: v for k, v in options.items() if v is not None}}
    if adapters:
        body["adapters"] = list(adapters)
    return body


def _images(response: Mapping[str, Any]) -> list[Generated]:
    return [
        Generated(
            image=Image.open(io.BytesIO(base64.b64decode(item["image"]))),
            seed=item["seed"],
            adapters=item["adapters"],
            settings=item["settings"],
            timings=item["timings"],
            format=item["format"],
        )
        for item in response["images"]
    ]


def _encode(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _score_request(images: Sequence[Image.Image], texts: Sequence[str]) -> dict:
    return {"images": [_encode(i) for i in images], "texts": list(texts)}


def _status(err: BentoMLException) -> int:
    return int(getattr(err, "error_code", 500))


class Client:
    """Blocking client: `generate`, `score`, `adapters`."""

    def __init__(
        self,
        url: str = "http://localhost:3000",
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = 3,
        backoff_s: float = 1.0,
        token: str | None = None,
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._http = bentoml.SyncHTTPClient(url, timeout=timeout, server_ready_timeout=timeout)
        if headers:
            self._http.client.headers.update(headers)
        self.retries, self.backoff_s = retries, backoff_s

    def _call(self, fn, **kwargs):
        for attempt in range(self.retries + 1):
            try:
                return fn(**kwargs)
            except BentoMLException as err:
                if _status(err) != RETRY_STATUS or attempt == self.retries:
                    raise
                time.sleep(self.backoff_s * 2**attempt)

    def generate(
        self,
        prompt: str,
        *,
        adapters: Mapping[str, float] | Sequence[Mapping] | None = None,
        **options: Any,
    ) -> list[Generated]:
        """Options: negative_prompt, width, height, steps, guidance, seed, num_images, scheduler,
        output_format (see the server's /docs)."""
        [response] = self._call(
            self._http.generate, requests=[_request(prompt, adapters, **options)]
        )
        return _images(response)

    def score(self, images: Sequence[Image.Image], texts: Sequence[str] = ()) -> Scores:
        [response] = self._call(
            self._http.score,
            requests=[_score_request(images, texts)],
        )
        return Scores(response["clip_scores"], response["image_similarity"])

    def adapters(self) -> list[dict[str, Any]]:
        response = self._http.client.get("/adapters/")
        response.raise_for_status()
        return response.json()["adapters"]

    def is_ready(self) -> bool:
        return self._http.is_ready()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The same over `bentoml.AsyncHTTPClient`, for many requests in flight from one process."""

    def __init__(
        self,
        url: str = "http://localhost:3000",
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = 3,
        backoff_s: float = 1.0,
        token: str | None = None,
    ):
        self._http = bentoml.AsyncHTTPClient(url, timeout=timeout, server_ready_timeout=timeout)
        if token:
            self._http.client.headers.update({"Authorization": f"Bearer {token}"})
        self.retries, self.backoff_s = retries, backoff_s

    async def _call(self, fn, **kwargs):
        for attempt in range(self.retries + 1):
            try:
                return await fn(**kwargs)
            except BentoMLException as err:
                if _status(err) != RETRY_STATUS or attempt == self.retries:
                    raise
                await asyncio.sleep(self.backoff_s * 2**attempt)

    async def generate(
        self,
        prompt: str,
        *,
        adapters: Mapping[str, float] | Sequence[Mapping] | None = None,
        **options: Any,
    ) -> list[Generated]:
        [response] = await self._call(
            self._http.generate, requests=[_request(prompt, adapters, **options)]
        )
        return _images(response)

    async def score(self, images: Sequence[Image.Image], texts: Sequence[str] = ()) -> Scores:
        [response] = await self._call(
            self._http.score,
            requests=[_score_request(images, texts)],
        )
        return Scores(response["clip_scores"], response["image_similarity"])

    async def close(self) -> None:
        await self._http.close()

    async def __aenter__(self) -> AsyncClient:
        await self._http.__aenter__()  # BentoML's async client connects here
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.__aexit__(*exc)

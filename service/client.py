"""Python client of the bentolora service, over BentoML's own HTTP clients.

    from service.client import Client
    with Client("http://localhost:3000", token="...") as client:
        images = client.generate("a red circle", width=1024, height=1024, adapters={"my-style": 0.8})
        images[0].image.save("out.png")

Timeouts are sized for SDXL on a busy GPU. Only 429 (overloaded: the queue is full) and 503 (not
ready, out of GPU memory) are retried, after the server's `Retry-After` (else with backoff), a
bounded number of times and seconds: retrying any other error would repeat a failure or
duplicate work. The token goes to BentoML's client at construction, so its first request (the
service's /schema.json) carries it too.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any, Literal

import bentoml
import httpx
from bentoml.exceptions import BentoMLException
from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
RETRY_STATUSES = frozenset({429, 503})

# The request fields, as in service/schemas.py's GenerateRequest (kept light: the client does not
# import the server's modules). tests/test_client.py checks that the two agree.
SchedulerName = Literal["euler", "euler_a", "dpmpp_2m_karras", "ddim", "unipc"]
OutputFormat = Literal["png", "jpeg", "webp"]
Adapters = Mapping[str, float] | Sequence[Mapping[str, Any]]
"""{name: scale}, or [{"name": ..., "scale": ...}] as the HTTP API takes them."""


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


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a request again: only on 429 and 503, at most `retries` times, waiting what
    the server's `Retry-After` says (else `backoff_s` × 2^attempt), never more than `max_wait_s`
    seconds in all; a wait that would go past that budget is not started, the error is raised."""

    retries: int = 3
    backoff_s: float = 1.0
    max_wait_s: float = 120.0

    def delay(self, response: httpx.Response, attempt: int, waited_s: float) -> float | None:
        """Seconds to wait before try `attempt + 1` (0 is the first), or None to give up."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.retries:
            return None
        delay = retry_after_s(response.headers.get("retry-after"))
        if delay is None:
            delay = self.backoff_s * 2**attempt
        return delay if waited_s + delay <= self.max_wait_s else None


def retry_after_s(value: str | None) -> float | None:
    """A `Retry-After` header in seconds (it is delay-seconds or an HTTP date); None when absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _error(response: httpx.Response) -> BentoMLException:
    try:
        status = HTTPStatus(response.status_code)
    except ValueError:
        status = HTTPStatus.INTERNAL_SERVER_ERROR
    return BentoMLException(f"{response.status_code}: {response.text}", error_code=status)


def _refusal(url: str, token: str | None, timeout: float) -> BentoMLException | None:
    """The server's answer to the client's first request (/schema.json) when it is an error, e.g.
    401 "missing bearer token": BentoML's client says only that fetching the schema failed."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(f"{url.rstrip('/')}/schema.json", headers=headers, timeout=timeout)
    except httpx.HTTPError:
        return None
    return _error(response) if response.is_error else None


def _request(prompt: str, adapters: Adapters | None, fields: Mapping[str, Any]) -> dict:
    """The JSON body of one generate request; fields left None take the server's defaults."""
    if isinstance(adapters, Mapping):
        adapters = [{"name": name, "scale": scale} for name, scale in adapters.items()]
    body = {"prompt": prompt, **{k: v for k, v in fields.items() if v is not None}}
    if adapters:
        body["adapters"] = list(adapters)
    return {"requests": [body]}


def _images(response: list[Mapping[str, Any]]) -> list[Generated]:
    [result] = response
    return [
        Generated(
            image=Image.open(io.BytesIO(base64.b64decode(item["image"]))),
            seed=item["seed"],
            adapters=item["adapters"],
            settings=item["settings"],
            timings=item["timings"],
            format=item["format"],
        )
        for item in result["images"]
    ]


def _encode(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


Size = tuple[int, int]
"""[height, width] (SDXL micro-conditioning, as diffusers takes it)."""
MODE_ONLY = ("self", "prompt", "image", "mask", "images", "adapters")


def _mode_request(
    prompt: str, images: Mapping[str, Image.Image], adapters: Adapters | None, fields: dict
) -> dict:
    """The body of one /img2img or /inpaint request: `images` (field: image) as base64 PNG."""
    body = _request(prompt, adapters, {k: v for k, v in fields.items() if k not in MODE_ONLY})
    body["requests"][0] |= {name: _encode(image) for name, image in images.items()}
    return body


Controls = Sequence[tuple[str, Image.Image, float]]
"""(ControlNet name, conditioning image, scale) for each ControlNet of a /controlnet request."""


def _control_request(
    prompt: str, controls: Controls, adapters: Adapters | None, fields: dict
) -> dict:
    """The body of one /controlnet request."""
    skip = (*MODE_ONLY, "controls")
    body = _request(prompt, adapters, {k: v for k, v in fields.items() if k not in skip})
    body["requests"][0]["controlnets"] = [
        {"name": name, "image": _encode(image), "scale": scale} for name, image, scale in controls
    ]
    return body


def _score_request(images: Sequence[Image.Image], texts: Sequence[str]) -> dict:
    return {"requests": [{"images": [_encode(i) for i in images], "texts": list(texts)}]}


def _scores(response: list[Mapping[str, Any]]) -> Scores:
    [result] = response
    return Scores(result["clip_scores"], result["image_similarity"])


def _job_body(requests: Sequence[Mapping[str, Any]], deadline_s: float | None) -> dict:
    body: dict[str, Any] = {"requests": [dict(r) for r in requests]}
    if deadline_s is not None:
        body["deadline_s"] = deadline_s
    return body


def _job_images(response: list[Mapping[str, Any]]) -> list[list[Generated]]:
    """A job's result: per request, its images."""
    return [_images([one]) for one in response]


def _log_retry(path: str, status: int, delay: float, attempt: int, retries: int) -> None:
    log.info("%s answered %d; retry %d of %d in %.1f s", path, status, attempt + 1, retries, delay)


class Client:
    """Blocking client: `generate`, `img2img`, `inpaint`, `score`, long jobs (`submit_job`,
    `job_progress`, `cancel_job`, `wait_job`), `adapters`, `is_ready`.

    `token`: the server's bearer token (BENTOLORA_TOKEN there). `retries`, `backoff_s` and
    `max_retry_wait_s` bound the retries of 429 and 503 (see RetryPolicy). Constructing waits up
    to `timeout` seconds for the server to be ready.
    """

    def __init__(
        self,
        url: str = "http://localhost:3000",
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = 3,
        backoff_s: float = 1.0,
        max_retry_wait_s: float = 120.0,
    ):
        self.retry = RetryPolicy(retries, backoff_s, max_retry_wait_s)
        try:
            self._http = bentoml.SyncHTTPClient(
                url, token=token, timeout=timeout, server_ready_timeout=timeout
            )
        except BentoMLException as err:
            refusal = _refusal(url, token, timeout)
            if refusal is None:
                raise
            raise refusal from err

    def _post(self, path: str, body: dict) -> Any:
        waited = 0.0
        attempt = 0
        while True:
            response = self._http.request("POST", path, json=body)
            if not response.is_error:
                return response.json()
            delay = self.retry.delay(response, attempt, waited)
            if delay is None:
                raise _error(response)
            _log_retry(path, response.status_code, delay, attempt, self.retry.retries)
            time.sleep(delay)
            waited += delay
            attempt += 1

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        num_images: int | None = None,
        scheduler: SchedulerName | None = None,
        adapters: Adapters | None = None,
        output_format: OutputFormat | None = None,
        original_size: Size | None = None,
        crops_coords_top_left: Size | None = None,
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size | None = None,
        negative_target_size: Size | None = None,
        deadline_s: float | None = None,
    ) -> list[Generated]:
        """Images for `prompt`. Each field left None takes the server's default; the limits are
        the server's (README, or its OpenAPI page at /): a bad value is answered 400 with the
        field and what is allowed, raised as BentoMLException. The size and crop fields are
        SDXL's micro-conditioning; past `deadline_s` the server stops and answers 504."""
        fields = {k: v for k, v in locals().items() if k not in MODE_ONLY}
        return _images(self._post("/generate", _request(prompt, adapters, fields)))

    def score(self, images: Sequence[Image.Image], texts: Sequence[str] = ()) -> Scores:
        return _scores(self._post("/score", _score_request(images, texts)))

    def img2img(
        self,
        prompt: str,
        image: Image.Image,
        *,
        strength: float | None = None,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        num_images: int | None = None,
        scheduler: SchedulerName | None = None,
        adapters: Adapters | None = None,
        output_format: OutputFormat | None = None,
        original_size: Size | None = None,
        crops_coords_top_left: Size | None = None,
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size | None = None,
        negative_target_size: Size | None = None,
        deadline_s: float | None = None,
    ) -> list[Generated]:
        """`image` redrawn after `prompt` (POST /img2img): `strength` 0 keeps it (through the
        VAE), 1 redraws all. Its sides must be multiples of 8; the output has its size. The
        other fields as generate's; the size and crop fields are SDXL's micro-conditioning."""
        body = _mode_request(prompt, {"image": image}, adapters, dict(locals()))
        return _images(self._post("/img2img", body))

    def inpaint(
        self,
        prompt: str,
        image: Image.Image,
        mask: Image.Image,
        *,
        strength: float | None = None,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        num_images: int | None = None,
        scheduler: SchedulerName | None = None,
        adapters: Adapters | None = None,
        output_format: OutputFormat | None = None,
        original_size: Size | None = None,
        crops_coords_top_left: Size | None = None,
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size | None = None,
        negative_target_size: Size | None = None,
        deadline_s: float | None = None,
    ) -> list[Generated]:
        """`image` redrawn where `mask` (the same size) is white, kept where it is black (POST
        /inpaint); the other fields as img2img's (strength defaults to 1 here)."""
        images = {"image": image, "mask": mask}
        return _images(
            self._post("/inpaint", _mode_request(prompt, images, adapters, dict(locals())))
        )

    def controlnet(
        self,
        prompt: str,
        controls: Controls,
        *,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        num_images: int | None = None,
        scheduler: SchedulerName | None = None,
        adapters: Adapters | None = None,
        output_format: OutputFormat | None = None,
        original_size: Size | None = None,
        crops_coords_top_left: Size | None = None,
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size | None = None,
        negative_target_size: Size | None = None,
        deadline_s: float | None = None,
    ) -> list[Generated]:
        """Images for `prompt` that follow each of `controls`' conditioning images (of the
        output's aspect ratio) through its stored ControlNet at its scale (POST /controlnet;
        [(name, image, scale)], up to 3; scale 0 gives the plain image). The other fields as
        generate's."""
        body = _control_request(prompt, controls, adapters, dict(locals()))
        return _images(self._post("/controlnet", body))

    def generate_with_refiner(
        self,
        prompt: str,
        *,
        handoff: float | None = None,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        num_images: int | None = None,
        scheduler: SchedulerName | None = None,
        adapters: Adapters | None = None,
        output_format: OutputFormat | None = None,
        original_size: Size | None = None,
        crops_coords_top_left: Size | None = None,
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size | None = None,
        negative_target_size: Size | None = None,
        deadline_s: float | None = None,
    ) -> list[Generated]:
        """As generate, with the server's refiner taking over after the `handoff` fraction of
        the steps (POST /generate_with_refiner; 0.8 when left out)."""
        body = _mode_request(prompt, {}, adapters, dict(locals()))
        return _images(self._post("/generate_with_refiner", body))

    def refine(
        self,
        prompt: str,
        image: Image.Image,
        *,
        strength: float | None = None,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        num_images: int | None = None,
        scheduler: SchedulerName | None = None,
        output_format: OutputFormat | None = None,
        original_size: Size | None = None,
        crops_coords_top_left: Size | None = None,
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size | None = None,
        negative_target_size: Size | None = None,
        deadline_s: float | None = None,
    ) -> list[Generated]:
        """`image` through the server's refiner as image-to-image (POST /refine; strength 0.3
        when left out); no adapters."""
        body = _mode_request(prompt, {"image": image}, None, dict(locals()))
        return _images(self._post("/refine", body))

    def _get(self, path: str) -> Any:
        response = self._http.request("GET", path)
        if response.is_error:
            raise _error(response)
        return response.json()

    def submit_job(
        self, requests: Sequence[Mapping[str, Any]], *, deadline_s: float | None = None
    ) -> str:
        """Start a long job (POST /job/submit): `requests` as /generate takes them (dicts of
        its fields); its task id. Progress: `job_progress`; result: `wait_job`."""
        return (self._post("/job/submit", _job_body(requests, deadline_s)))["task_id"]

    def job_progress(self, task_id: str) -> dict[str, Any]:
        """GET /jobs/{task_id}: state (queued, running, done, cancelled, expired, failed),
        images and denoising steps done."""
        return self._get(f"/jobs/{task_id}")

    def cancel_job(self, task_id: str) -> dict[str, Any]:
        """Stop the job within one denoising step; its progress when the cancel came."""
        return self._post(f"/jobs/{task_id}/cancel", {})

    def wait_job(
        self, task_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None
    ) -> list[list[Generated]]:
        """The job's images, per request, once it is done; BentoMLException if it was
        cancelled, expired or failed (with the server's reason), or TimeoutError."""
        end = None if timeout_s is None else time.monotonic() + timeout_s
        status = f"/job/status?task_id={task_id}"
        while (state := (self._get(status))["status"]) == "in_progress":
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"job {task_id} still {state} after {timeout_s} s")
            time.sleep(poll_s)
        return _job_images(self._get(f"/job/get?task_id={task_id}"))

    def controlnets(self) -> dict[str, Any]:
        """The ControlNets /controlnet can use and the refiner served (GET /controlnets/)."""
        return self._get("/controlnets/")

    def adapters(self) -> list[dict[str, Any]]:
        """The adapters the server serves, with their metadata (GET /adapters/)."""
        response = self._http.request("GET", "/adapters/")
        if response.is_error:
            raise _error(response)
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
    """The same over `bentoml.AsyncHTTPClient`, for many requests in flight from one process:
    `async with AsyncClient(url, token=...) as client: await client.generate(...)`."""

    def __init__(
        self,
        url: str = "http://localhost:3000",
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = 3,
        backoff_s: float = 1.0,
        max_retry_wait_s: float = 120.0,
    ):
        self.retry = RetryPolicy(retries, backoff_s, max_retry_wait_s)
        self._url, self._token, self._timeout = url, token, timeout
        self._http = bentoml.AsyncHTTPClient(
            url, token=token, timeout=timeout, server_ready_timeout=timeout
        )

    async def _post(self, path: str, body: dict) -> Any:
        waited = 0.0
        attempt = 0
        while True:
            response = await self._http.request("POST", path, json=body)
            if not response.is_error:
                return response.json()
            delay = self.retry.delay(response, attempt, waited)
            if delay is None:
                raise _error(response)
            _log_retry(path, response.status_code, delay, attempt, self.retry.retries)
            await asyncio.sleep(delay)
            waited += delay
            attempt += 1

    async def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        num_images: int | None = None,
        scheduler: SchedulerName | None = None,
        adapters: Adapters | None = None,
        output_format: OutputFormat | None = None,
        original_size: Size | None = None,
        crops_coords_top_left: Size | None = None,
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size | None = None,
        negative_target_size: Size | None = None,
        deadline_s: float | None = None,
    ) -> list[Generated]:
        """As Client.generate."""
        fields = {k: v for k, v in locals().items() if k not in MODE_ONLY}
        return _images(await self._post("/generate", _request(prompt, adapters, fields)))

    async def score(self, images: Sequence[Image.Image], texts: Sequence[str] = ()) -> Scores:
        return _scores(await self._post("/score", _score_request(images, texts)))

    async def img2img(
        self,
        prompt: str,
        image: Image.Image,
        *,
        strength: float | None = None,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        num_images: int | None = None,
        scheduler: SchedulerName | None = None,
        adapters: Adapters | None = None,
        output_format: OutputFormat | None = None,
        original_size: Size | None = None,
        crops_coords_top_left: Size | None = None,
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size | None = None,
        negative_target_size: Size | None = None,
        deadline_s: float | None = None,
    ) -> list[Generated]:
        """`image` redrawn after `prompt` (POST /img2img): `strength` 0 keeps it (through the
        VAE), 1 redraws all. Its sides must be multiples of 8; the output has its size. The
        other fields as generate's; the size and crop fields are SDXL's micro-conditioning."""
        body = _mode_request(prompt, {"image": image}, adapters, dict(locals()))
        return _images(await self._post("/img2img", body))

    async def inpaint(
        self,
        prompt: str,
        image: Image.Image,
        mask: Image.Image,
        *,
        strength: float | None = None,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        num_images: int | None = None,
        scheduler: SchedulerName | None = None,
        adapters: Adapters | None = None,
        output_format: OutputFormat | None = None,
        original_size: Size | None = None,
        crops_coords_top_left: Size | None = None,
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size | None = None,
        negative_target_size: Size | None = None,
        deadline_s: float | None = None,
    ) -> list[Generated]:
        """`image` redrawn where `mask` (the same size) is white, kept where it is black (POST
        /inpaint); the other fields as img2img's (strength defaults to 1 here)."""
        images = {"image": image, "mask": mask}
        return _images(
            await self._post("/inpaint", _mode_request(prompt, images, adapters, dict(locals())))
        )

    async def controlnet(
        self,
        prompt: str,
        controls: Controls,
        *,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        num_images: int | None = None,
        scheduler: SchedulerName | None = None,
        adapters: Adapters | None = None,
        output_format: OutputFormat | None = None,
        original_size: Size | None = None,
        crops_coords_top_left: Size | None = None,
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size | None = None,
        negative_target_size: Size | None = None,
        deadline_s: float | None = None,
    ) -> list[Generated]:
        """Images for `prompt` that follow each of `controls`' conditioning images (of the
        output's aspect ratio) through its stored ControlNet at its scale (POST /controlnet;
        [(name, image, scale)], up to 3; scale 0 gives the plain image). The other fields as
        generate's."""
        body = _control_request(prompt, controls, adapters, dict(locals()))
        return _images(await self._post("/controlnet", body))

    async def generate_with_refiner(
        self,
        prompt: str,
        *,
        handoff: float | None = None,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        num_images: int | None = None,
        scheduler: SchedulerName | None = None,
        adapters: Adapters | None = None,
        output_format: OutputFormat | None = None,
        original_size: Size | None = None,
        crops_coords_top_left: Size | None = None,
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size | None = None,
        negative_target_size: Size | None = None,
        deadline_s: float | None = None,
    ) -> list[Generated]:
        """As generate, with the server's refiner taking over after the `handoff` fraction of
        the steps (POST /generate_with_refiner; 0.8 when left out)."""
        body = _mode_request(prompt, {}, adapters, dict(locals()))
        return _images(await self._post("/generate_with_refiner", body))

    async def refine(
        self,
        prompt: str,
        image: Image.Image,
        *,
        strength: float | None = None,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        num_images: int | None = None,
        scheduler: SchedulerName | None = None,
        output_format: OutputFormat | None = None,
        original_size: Size | None = None,
        crops_coords_top_left: Size | None = None,
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size | None = None,
        negative_target_size: Size | None = None,
        deadline_s: float | None = None,
    ) -> list[Generated]:
        """`image` through the server's refiner as image-to-image (POST /refine; strength 0.3
        when left out); no adapters."""
        body = _mode_request(prompt, {"image": image}, None, dict(locals()))
        return _images(await self._post("/refine", body))

    async def _get(self, path: str) -> Any:
        response = await self._http.request("GET", path)
        if response.is_error:
            raise _error(response)
        return response.json()

    async def submit_job(
        self, requests: Sequence[Mapping[str, Any]], *, deadline_s: float | None = None
    ) -> str:
        """Start a long job (POST /job/submit): `requests` as /generate takes them (dicts of
        its fields); its task id. Progress: `job_progress`; result: `wait_job`."""
        return (await self._post("/job/submit", _job_body(requests, deadline_s)))["task_id"]

    async def job_progress(self, task_id: str) -> dict[str, Any]:
        """GET /jobs/{task_id}: state (queued, running, done, cancelled, expired, failed),
        images and denoising steps done."""
        return await self._get(f"/jobs/{task_id}")

    async def cancel_job(self, task_id: str) -> dict[str, Any]:
        """Stop the job within one denoising step; its progress when the cancel came."""
        return await self._post(f"/jobs/{task_id}/cancel", {})

    async def wait_job(
        self, task_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None
    ) -> list[list[Generated]]:
        """The job's images, per request, once it is done; BentoMLException if it was
        cancelled, expired or failed (with the server's reason), or TimeoutError."""
        end = None if timeout_s is None else time.monotonic() + timeout_s
        status = f"/job/status?task_id={task_id}"
        while (state := (await self._get(status))["status"]) == "in_progress":
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"job {task_id} still {state} after {timeout_s} s")
            await asyncio.sleep(poll_s)
        return _job_images(await self._get(f"/job/get?task_id={task_id}"))

    async def controlnets(self) -> dict[str, Any]:
        """The ControlNets /controlnet can use and the refiner served (GET /controlnets/)."""
        return await self._get("/controlnets/")

    async def adapters(self) -> list[dict[str, Any]]:
        """The adapters the server serves, with their metadata (GET /adapters/)."""
        response = await self._http.request("GET", "/adapters/")
        if response.is_error:
            raise _error(response)
        return response.json()["adapters"]

    async def is_ready(self) -> bool:
        return await self._http.is_ready()

    async def close(self) -> None:
        await self._http.close()

    async def __aenter__(self) -> AsyncClient:
        try:
            await self._http.__aenter__()  # BentoML's async client waits for the server here
        except BentoMLException as err:
            refusal = await asyncio.to_thread(_refusal, self._url, self._token, self._timeout)
            if refusal is None:
                raise
            raise refusal from err
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.__aexit__(*exc)

"""Long jobs: many images without a connection held open, with progress and cancel.

BentoML's task endpoint (`@bentoml.task` on `SDXLLoRA.job`) gives the submit / status / get
routes: `POST /job/submit` answers a task id at once and runs the job in the background. What it
does not give, this module adds:

- progress: `GET /jobs/{task_id}` (`jobs_app`) says the job's state, images done of all,
  denoising steps done (and of the call running), and a small preview of the image in progress
  (its latents mapped linearly to RGB every PREVIEW_EVERY steps: no VAE decode);
- cancel that stops the GPU work: `POST /jobs/{task_id}/cancel`, and BentoML's own `PUT
  /job/cancel?task_id=` (which on its own only relabels the task, the work running on; the
  `CancelJobs` gate passes it here first). The job's pipeline call checks after each denoising
  step and stops by raising out of the pipeline (no further step, no VAE decode): at most the
  step running when the cancel came completes. (diffusers' own `pipe._interrupt` would skip the
  remaining steps but still decode.)
- a deadline (`deadline_s`, from submission): past it, the job stops the same way;
- a bound: at most BENTOLORA_MAX_QUEUE jobs queued or running (`JobGate`: 429 past it).

A job's images are made as /generate makes them (service.image_modes' text-to-image mode: one
pipeline call per group of alike requests, a generator per image from the request's seed), so
its result equals the same requests sent to /generate, to the batching tolerance. Jobs run one
at a time, each call under the engine's pipeline lock, so synchronous requests interleave with a
job's calls. The board keeps the last `KEEP_FINISHED` finished jobs' progress.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import anyio
import anyio.to_thread
from bentoml.exceptions import BentoMLException
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

KEEP_FINISHED = 256
"""Finished jobs whose progress the board still answers."""
PREVIEW_EVERY = 5
"""Denoising steps between two previews of a job's image in progress."""
SDXL_LATENT_RGB = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)
"""A linear map from SDXL's 4 latent channels to RGB in [-1, 1] (as ComfyUI's and A1111's
cheap previews use): no VAE decode, 1/8 of the image's size."""
JOB_SCALE = 8
"""A job holds at most this many times the entries and images one synchronous request may
(BENTOLORA_MAX_REQUEST_ITEMS, _IMAGES)."""


class JobStopped(BentoMLException):
    """A job cancelled (409 in its result) or past its deadline (504)."""

    def __init__(self, why: str, status: HTTPStatus):
        super().__init__(why, error_code=status)


@dataclass
class Job:
    task_id: str
    images_total: int
    deadline: float | None = None
    """time.monotonic() past which the job stops; None: none."""
    state: str = "queued"
    images_done: int = 0
    steps_done: int = 0
    call_step: int = 0
    call_steps: int = 0
    steps_at_cancel: int | None = None
    """Denoising steps done when the cancel came: steps_done - steps_at_cancel is what ran after
    it (the guarantee: at most 1)."""
    preview: str | None = None
    """Base64 PNG of the running call's first image, from its latents every PREVIEW_EVERY
    steps (1/8 of the image's size)."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)

    def progress(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "state": self.state,
            "images_done": self.images_done,
            "images_total": self.images_total,
            "steps_done": self.steps_done,
            "call_step": self.call_step,
            "call_steps": self.call_steps,
            "steps_at_cancel": self.steps_at_cancel,
            "elapsed_s": round(time.monotonic() - self.started, 3),
            "preview": self.preview,
        }

    def on_step(self, pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        """diffusers' callback_on_step_end: count the step, then stop if cancelled or late."""
        self.steps_done += 1
        self.call_step, self.call_steps = step + 1, pipe.num_timesteps
        latents = kwargs.get("latents")
        if (step + 1) % PREVIEW_EVERY == 0 and latents is not None and latents.shape[1] == 4:
            self.preview = latent_preview(latents[0])
        if self.cancelled.is_set():
            raise JobStopped(f"job {self.task_id} was cancelled", HTTPStatus.CONFLICT)
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise JobStopped(f"job {self.task_id} passed its deadline", HTTPStatus.GATEWAY_TIMEOUT)
        return kwargs

    def on_images(self, count: int) -> None:
        self.images_done += count


def latent_preview(latents: Any) -> str:
    """Base64 PNG of one image's latents (4 × h × w) through SDXL_LATENT_RGB: h × w pixels."""
    import torch

    from service.images import encode

    factors = torch.tensor(SDXL_LATENT_RGB, dtype=torch.float32)
    bias = torch.tensor(SDXL_LATENT_RGB_BIAS, dtype=torch.float32)
    rgb = latents.detach().float().cpu().permute(1, 2, 0) @ factors + bias
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    from PIL import Image

    return encode(Image.fromarray(pixels, "RGB"), "png")


class JobBoard:
    """The jobs of one server process: started by the task endpoint, read and cancelled by
    `jobs_app` and `CancelJobs`."""

    def __init__(self, max_items: int = 16 * JOB_SCALE, max_images: int = 32 * JOB_SCALE) -> None:
        self.max_items = max_items
        self.max_images = max_images
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._one_at_a_time: anyio.CapacityLimiter | None = None

    def get(self, task_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(task_id)

    def active(self) -> int:
        """Jobs queued or running."""
        with self._lock:
            return sum(j.state in ("queued", "running") for j in self._jobs.values())

    def cancel(self, task_id: str) -> Job | None:
        job = self.get(task_id)
        if job is not None and job.state in ("queued", "running") and not job.cancelled.is_set():
            job.steps_at_cancel = job.steps_done
            job.cancelled.set()
            log.info("job %s: cancel requested at step %d", task_id, job.steps_done)
        return job

    def _add(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.task_id] = job
            finished = [k for k, j in self._jobs.items() if j.state not in ("queued", "running")]
            for key in finished[: max(0, len(finished) - KEEP_FINISHED)]:
                del self._jobs[key]

    async def run(
        self, modes: Any, task_id: str, requests: Sequence[Any], deadline_s: float | None
    ) -> list:
        """The job's responses (as /generate's), computed in a worker thread; JobStopped when it
        was cancelled or passed its deadline."""
        self._check_size(requests)
        job = Job(
            task_id,
            images_total=sum(r.num_images for r in requests),
            deadline=time.monotonic() + deadline_s if deadline_s is not None else None,
        )
        self._add(job)
        if self._one_at_a_time is None:
            self._one_at_a_time = anyio.CapacityLimiter(1)
        try:
            async with self._one_at_a_time:
                job.state = "running"
                responses = await anyio.to_thread.run_sync(self._work, modes, job, requests)
        except JobStopped:
            job.state = "cancelled" if job.cancelled.is_set() else "expired"
            raise
        except Exception:
            job.state = "failed"
            raise
        job.state = "done"
        return responses

    def _check_size(self, requests: Sequence[Any]) -> None:
        images = sum(r.num_images for r in requests)
        if not requests or len(requests) > self.max_items or images > self.max_images:
            raise BentoMLException(
                f"requests: {len(requests)} entries, {images} images; a job holds 1 to "
                f"{self.max_items} entries and at most {self.max_images} images "
                f"({JOB_SCALE} x BENTOLORA_MAX_REQUEST_ITEMS and _IMAGES)",
                error_code=HTTPStatus.BAD_REQUEST,
            )

    @staticmethod
    def _work(modes: Any, job: Job, requests: Sequence[Any]) -> list:
        if job.cancelled.is_set():
            raise JobStopped(f"job {job.task_id} was cancelled", HTTPStatus.CONFLICT)
        # Not the server's request timeout: a job runs as long as it takes, or to its deadline.
        return modes.run(
            "generate", requests, on_step=job.on_step, on_images=job.on_images, timeout_s=math.inf
        )


def jobs_app(board: JobBoard) -> Starlette:
    """`GET /jobs/{task_id}`: progress; `POST /jobs/{task_id}/cancel`: stop it (mounted at
    /jobs; the bearer token guards it as every API route)."""

    def found(request: Request) -> Job | JSONResponse:
        job = board.get(request.path_params["task_id"])
        if job is None:
            return JSONResponse(
                {"error": "no such job on this server (ids come from POST /job/submit)"}, 404
            )
        return job

    async def progress(request: Request) -> JSONResponse:
        job = found(request)
        return job if isinstance(job, JSONResponse) else JSONResponse(job.progress())

    async def cancel(request: Request) -> JSONResponse:
        job = found(request)
        if isinstance(job, JSONResponse):
            return job
        board.cancel(job.task_id)
        return JSONResponse(job.progress())

    return Starlette(
        routes=[
            Route("/{task_id}", progress, methods=["GET"]),
            Route("/{task_id}/cancel", cancel, methods=["POST"]),
        ]
    )


class JobGate:
    """In front of BentoML's task routes: `POST /job/submit` is answered 429 (with
    Retry-After) while `max_jobs` jobs are queued or running, so submitted jobs cannot pile up
    without bound; BentoML's `PUT /job/cancel?task_id=`, which on its own only relabels the
    task, stops its work first."""

    def __init__(self, app: ASGIApp, board: JobBoard, max_jobs: int, route: str = "/job"):
        self.app = app
        self.board = board
        self.max_jobs = max_jobs
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"].rstrip("/")
            if method == "POST" and path == self.route:
                from service.request_guard import refuse

                return await refuse(
                    scope,
                    receive,
                    send,
                    404,
                    f"submit jobs with POST {self.route}/submit (then GET /jobs/{{task_id}}, "
                    f"GET {self.route}/get?task_id=); /generate answers synchronously",
                )
            if method == "PUT" and path == f"{self.route}/cancel":
                task_id = Request(scope).query_params.get("task_id")
                if task_id:
                    self.board.cancel(task_id)
            elif method == "POST" and path == f"{self.route}/submit":
                if self.board.active() >= self.max_jobs:
                    from service.request_guard import refuse

                    return await refuse(
                        scope,
                        receive,
                        send,
                        429,
                        f"{self.max_jobs} jobs are queued or running (BENTOLORA_MAX_QUEUE); "
                        "retry when one has finished",
                        {"Retry-After": "10"},
                    )
        await self.app(scope, receive, send)

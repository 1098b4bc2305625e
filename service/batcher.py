"""The service's own batching window: requests from many clients into one engine call.

BentoML's adaptive batcher (bentoml/_internal/marshal/dispatcher.py) waits before each batch for
as long as the past 50 batches' first requests waited, queueing included. Nothing bounds that
wait but `max_latency_ms`, past which it answers 503; and every batch it makes that way is
another sample of the same wait. One request of 5,000 items (split into batches whose first
request had waited since the request arrived) taught it a wait of seconds, and every later lone
request then waited that long and taught it the same again: 17-49 s for a request the pipeline
computed in 0.03 s, for good. Plain load drifted it the same way (0.05 s to 0.2-0.9 s).

`Batcher` has no memory: the first request in an idle queue waits at most `window_s` for others
(less once `max_images` images are queued), then the batch runs on the engine (`run`, in a worker
thread, one batch at a time). Requests that arrive while a batch runs wait for it and form the
next batch, which starts as soon as it ends. So a lone request's latency is its compute plus at
most `window_s`, whatever came before.

Each request is a job; a job is never split (BENTOLORA_MAX_REQUEST_IMAGES bounds its size), and
a batch takes whole jobs in arrival order up to `max_images` images (at least one job). A job
that needs something loaded first (`is_ready` false: an adapter not on the device) is left in
the queue while `prepare` loads it in a thread of its own; the jobs behind it form batches
meanwhile, and it joins the next batch once loaded. A job whose client has gone (`gone`, set
by service.admission when the connection closes) or whose deadline has passed (the server's
timeout cancelled it) is dropped before it starts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import anyio
import anyio.to_thread

from service import metrics

log = logging.getLogger(__name__)

CLIENT_GONE = "bentolora.client_gone"
"""Scope key of the asyncio.Event that service.admission sets when the client disconnects."""
CLIENT_CLOSED_REQUEST = 499
"""The status logged for a request whose client left before its answer (nginx's convention)."""


class ClientGone(Exception):
    """The client of a job disconnected before its answer was ready."""

    def __init__(self, started: bool):
        self.started = started
        super().__init__("the client disconnected")


@dataclass(eq=False)
class Job:
    items: Sequence[Any]
    images: int
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    started: bool = False
    abandoned: bool = False
    preparing: bool = False
    prepared: bool = False
    failed: bool = False


class Batcher:
    """Batches for one endpoint. `run(items)` computes a batch (a list of request items, in
    order) and returns one output per item; `images_of(item)` is what an item costs in the batch
    size cap; `is_ready(item)` false means `prepare(items)` (blocking, run in a thread beside the
    batches) must run before the item's job can join a batch. Call `submit` from the server's
    event loop."""

    def __init__(
        self,
        endpoint: str,
        run: Callable[[list], Sequence[Any]],
        images_of: Callable[[Any], int],
        *,
        max_images: int,
        window_s: float,
        is_ready: Callable[[Any], bool] | None = None,
        prepare: Callable[[list], None] | None = None,
    ):
        self.endpoint = endpoint
        self.run = run
        self.images_of = images_of
        self.max_images = max_images
        self.window_s = window_s
        self.is_ready = is_ready
        self.prepare = prepare
        self._queue: deque[Job] = deque()
        self._wake: asyncio.Event | None = None
        self._consumer: asyncio.Task | None = None
        self._limiter: anyio.CapacityLimiter | None = None

    async def submit(self, items: Sequence[Any], gone: asyncio.Event | None = None) -> list:
        """The outputs for `items` (one request's), once a batch holding them has run. Raises
        what the batch raised, or ClientGone when `gone` is set first (the job is then dropped
        if it has not started, its outputs discarded if it has)."""
        if not items:
            return []
        job = Job(
            items, sum(self.images_of(i) for i in items), asyncio.get_running_loop().create_future()
        )
        self._enqueue(job)
        try:
            if gone is None:
                return list(await job.future)
            waiter = asyncio.ensure_future(gone.wait())
            try:
                await asyncio.wait({job.future, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if job.future.done():
                return list(job.future.result())
            job.abandoned = True
            raise ClientGone(job.started)
        finally:
            if not job.future.done():
                job.future.cancel()  # gone, or cancelled by the server's timeout: not run

    def _enqueue(self, job: Job) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._queue.append(job)
        self._wake.set()
        if self._consumer is None or self._consumer.done():
            self._consumer = asyncio.get_running_loop().create_task(self._consume())

    async def _consume(self) -> None:
        while True:
            try:
                await self._next_batch()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop batching for good
                log.exception("batching %s failed", self.endpoint)

    async def _next_batch(self) -> None:
        assert self._wake is not None
        while not self._queue:
            self._wake.clear()
            await self._wake.wait()
        await self._window()
        self._wake.clear()  # before taking: a load that ends meanwhile wakes the wait below
        batch = self._take()
        if batch:
            await self._run(batch)
        elif self._queue:  # every queued job is loading what it needs
            await self._wake.wait()

    async def _run(self, batch: list[Job]) -> None:
        for job in batch:
            job.started = True
        items = [item for job in batch for item in job.items]
        metrics.batch_requests(self.endpoint, len(batch))
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        try:
            outputs = await anyio.to_thread.run_sync(self.run, items, limiter=self._limiter)
        except Exception as err:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        at = 0
        for job in batch:
            if not job.future.done():
                job.future.set_result(outputs[at : at + len(job.items)])
            at += len(job.items)

    async def _window(self) -> None:
        """Wait, from the first queued job's arrival, up to `window_s` for `max_images` images."""
        assert self._wake is not None
        first = self._queue[0]
        while self._queued_images() < self.max_images:
            left = first.arrived + self.window_s - time.monotonic()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    def _queued_images(self) -> int:
        return sum(job.images for job in self._queue if not job.future.done())

    def _take(self) -> list[Job]:
        """Whole jobs in arrival order, up to `max_images` images (at least one job); jobs
        already answered (client gone, deadline passed) are dropped here, unrun; jobs still
        loading what they need stay queued, in their order."""
        batch: list[Job] = []
        kept: deque[Job] = deque()
        images = 0
        while self._queue:
            job = self._queue.popleft()
            if job.future.done():
                self._dropped(job)
            elif not self._ready(job):
                kept.append(job)
            elif batch and images + job.images > self.max_images:
                kept.append(job)
                kept.extend(self._queue)
                self._queue.clear()
            else:
                batch.append(job)
                images += job.images
        self._queue = kept
        return batch

    def _ready(self, job: Job) -> bool:
        """Whether `job` can run now; if not, start loading what it needs (once)."""
        if self.is_ready is None or job.prepared:
            return True
        if all(self.is_ready(item) for item in job.items):
            return True
        if not job.preparing:
            job.preparing = True
            asyncio.get_running_loop().create_task(self._prepare(job))
        return False

    async def _prepare(self, job: Job) -> None:
        assert self.prepare is not None and self._wake is not None
        try:
            await anyio.to_thread.run_sync(self.prepare, list(job.items))
        except Exception as err:  # this job's own failure (e.g. its adapter left the store)
            if not job.future.done():
                job.failed = True
                job.future.set_exception(err)
        finally:
            job.prepared = True
            self._wake.set()

    def _dropped(self, job: Job) -> None:
        if job.abandoned or job.failed:
            return  # counted and logged where the client was found gone, or answered its error
        metrics.dropped(len(job.items))
        log.warning(
            "%s: dropping a request of %d item(s) past its deadline, unrun",
            self.endpoint,
            len(job.items),
        )


async def serve(batcher: Batcher, items: Sequence[Any], ctx: Any) -> Any:
    """An API's body: `items` through `batcher`; for a client that disconnected meanwhile, a
    499 (logged as such; nobody reads it) instead of an error; past a request's own
    `deadline_s`, a 504 that says so."""
    from starlette.responses import JSONResponse, Response

    request = getattr(ctx, "request", None)
    gone = request.scope.get(CLIENT_GONE) if request is not None else None
    for item in items:
        if hasattr(item, "client_gone"):  # GenerateRequest: the engine skips it once gone
            item._gone = gone
    try:
        return await within_own_deadline(batcher.submit(items, gone), items)
    except PastDeadline as err:
        log.info("%s: %s", batcher.endpoint, err)
        ctx.response.status_code = HTTPStatus.GATEWAY_TIMEOUT
        return JSONResponse({"error": str(err)}, status_code=HTTPStatus.GATEWAY_TIMEOUT)
    except ClientGone as err:
        metrics.abandoned(batcher.endpoint, started=err.started)
        log.info(
            "%s: the client disconnected %s; %s",
            batcher.endpoint,
            "after its batch began" if err.started else "before its request started",
            "what is not computed yet is dropped" if err.started else "it is dropped unrun",
        )
        ctx.response.status_code = CLIENT_CLOSED_REQUEST
        return Response(status_code=CLIENT_CLOSED_REQUEST)


async def within_own_deadline(work: Any, items: Sequence[Any]) -> list:
    """`work`'s responses, or a 504 once the earliest `deadline_s` among `items` has passed (a
    call is answered as one). The engine drops the late request's images from the GPU batch at
    its next step on its own (`GenerateRequest.unwanted`); an answer that comes back short of a
    late request's images is a 504 too. The server's timeout (BENTOLORA_REQUEST_TIMEOUT_S) is
    BentoML's, over every route."""
    own = [i for i in items if getattr(i, "deadline_s", None) is not None]
    if not own:
        return await work
    left = min(i.time_left(math.inf) for i in own)
    try:
        responses = await asyncio.wait_for(work, timeout=max(left, 0.0))
    except TimeoutError:
        raise PastDeadline(own) from None
    for item, response in zip(items, responses, strict=True):
        late = getattr(item, "deadline_s", None) is not None and item.time_left(math.inf) < 0
        if late and len(response.images) < item.num_images:
            raise PastDeadline(own)
    return responses


class PastDeadline(Exception):
    """A request's own `deadline_s` passed before its answer was ready (answered 504 with this
    message: BentoML would replace a 5xx exception's message with a generic one)."""

    def __init__(self, items: Sequence[Any]):
        first = min(items, key=lambda i: i.deadline_s)
        super().__init__(
            f"deadline_s: the request's deadline ({first.deadline_s:g} s from its arrival) "
            "passed before its images were ready; their GPU work stopped at the next "
            "denoising step"
        )


def mark_client(request: Any) -> Any:
    """Validator of the batchable /generate entry's items (service.service): give each
    GenerateRequest its own request's client-gone event. It runs while BentoML parses the body,
    in the request's own task, where `bentoml.Context().request` is that request; the batch
    function later runs in BentoML's dispatcher task, where it is not (there ctx.request is
    whichever request started the dispatcher). With the event on the item, the step scheduler
    retires the item's images at its next step once the client has gone."""
    import bentoml

    try:
        scope = bentoml.Context().request.scope
    except LookupError:  # parsed outside a request (a test, the OpenAPI example)
        return request
    if hasattr(request, "client_gone"):
        request._gone = scope.get(CLIENT_GONE)
    return request


async def serve_batch(queue: Any, items: Sequence[Any]) -> list:
    """The batchable /generate entry's body (BENTOLORA_STEP_ENTRY=batchable): one BentoML batch,
    the entries of the requests it joined in arrival order, to the step scheduler as one
    submission (`queue`: service.step_scheduler.StepQueue); one response per entry, which
    BentoML splits back to the requests. No 499 for a client that has gone: its entries' images
    are retired at the scheduler's next step (mark_client) and the batch answers the others."""
    metrics.batch_requests(queue.endpoint, len(items))
    return await queue.submit(items)


def batch_options(settings: Any) -> dict:
    """The batchable entry's `@bentoml.api` options. BentoML's dispatcher runs one batch at a
    time and counts a batch in entries; a batch holds at most as many entries as a request may
    (BENTOLORA_MAX_REQUEST_ITEMS) or as the scheduler has in flight (BENTOLORA_MAX_BATCH_IMAGES),
    whichever is more. It answers 503 to a request that waited past `max_latency_ms`: the
    server's request timeout, so that is never sooner than the other entries' 504."""
    return {
        "batchable": True,
        "batch_dim": 0,
        "max_batch_size": max(2, settings.max_request_items, settings.max_batch_images),
        "max_latency_ms": settings.request_timeout_s * 1000,
    }


SCORE_BATCH_IMAGES = 64
"""Images in one CLIP call at most (a /score request holds at most BENTOLORA_MAX_REQUEST_IMAGES)."""


@dataclass(frozen=True)
class EngineBatchers:
    generate: Any
    """The Batcher, or in step mode the step scheduler's queue (service.step_scheduler)."""
    score: Batcher


def for_engine(engine: Any, settings: Any) -> EngineBatchers:
    """The batchers of a service instance; both wait at most BENTOLORA_BATCH_WINDOW_MS for
    company. A /generate batch holds as many images as one request may
    (BENTOLORA_MAX_REQUEST_IMAGES), so waiting behind a batch is never longer than behind the
    largest request; the engine computes it in pipeline calls of BENTOLORA_MAX_BATCH_IMAGES per
    group of alike requests (a batch capped at one call's images would make mixed requests
    share fewer, smaller calls). A /score batch holds SCORE_BATCH_IMAGES images."""
    window_s = settings.batch_window_ms / 1000
    if engine.steps is not None:
        from service.step_scheduler import StepQueue

        generate = StepQueue(engine)
    else:
        generate = Batcher(
            "/generate",
            engine.generate,
            lambda request: request.num_images,
            max_images=max(settings.max_request_images, settings.max_batch_images),
            window_s=window_s,
            is_ready=engine.adapters_resident,
            prepare=engine.load_adapters,
        )
    return EngineBatchers(
        generate=generate,
        score=Batcher(
            "/score",
            engine.score,
            lambda request: len(request.images),
            max_images=SCORE_BATCH_IMAGES,
            window_s=window_s,
        ),
    )

"""The service's batching window (service/batcher.py) and admission by work (service/admission.py),
in process. The real server's behaviour is in test_robust_batching.py."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from service.admission import Admission, Demand, RequestLimits, measure, over_cap
from service.batcher import CLIENT_GONE, Batcher, ClientGone
from service.state import LiveStatus


class Engine:
    """Stands in for Engine.generate: records each batch, answers item -> item * 10; `hold`
    keeps a batch running until set."""

    def __init__(self, fail_on: int | None = None):
        self.batches: list[list[int]] = []
        self.started: list[float] = []
        self.hold = threading.Event()
        self.hold.set()
        self.fail_on = fail_on

    def __call__(self, items: list[int]) -> list[int]:
        self.started.append(time.monotonic())
        self.batches.append(list(items))
        self.hold.wait(10)
        if self.fail_on in items:
            raise ValueError(f"item {self.fail_on} failed")
        return [item * 10 for item in items]


def batcher(engine, max_images=4, window_s=0.05) -> Batcher:
    return Batcher("/generate", engine, lambda item: 1, max_images=max_images, window_s=window_s)


def test_requests_sent_together_share_a_batch_and_each_gets_its_own_outputs():
    engine = Engine()

    async def run():
        b = batcher(engine, max_images=8)
        return await asyncio.gather(b.submit([1, 2]), b.submit([3]), b.submit([4, 5]))

    assert asyncio.run(run()) == [[10, 20], [30], [40, 50]]
    assert engine.batches == [[1, 2, 3, 4, 5]]


def test_a_batch_takes_whole_requests_in_arrival_order_up_to_max_images():
    engine = Engine()

    async def run():
        b = batcher(engine, max_images=4)
        return await asyncio.gather(b.submit([1, 2, 3]), b.submit([4, 5]), b.submit([6]))

    assert asyncio.run(run()) == [[10, 20, 30], [40, 50], [60]]
    assert engine.batches == [[1, 2, 3], [4, 5, 6]]  # never split, never reordered


def test_an_error_reaches_every_request_of_its_batch_and_the_next_batch_runs():
    engine = Engine(fail_on=2)

    async def run():
        b = batcher(engine, max_images=2)
        first = await asyncio.gather(b.submit([1]), b.submit([2]), return_exceptions=True)
        return first, await b.submit([3])

    first, after = asyncio.run(run())
    assert [type(r) for r in first] == [ValueError, ValueError] and after == [30]


def test_a_lone_request_waits_at_most_the_window_whatever_came_before():
    """BentoML's batcher learned its wait from past batches: after a long queue, every lone
    request waited as long as that queue had. This one has no memory."""
    engine = Engine()
    window = 0.05

    async def lone(b: Batcher) -> float:
        submitted = time.monotonic()
        await b.submit([0])
        return engine.started[-1] - submitted

    async def run():
        b = batcher(engine, max_images=1, window_s=window)
        fresh = await lone(b)
        engine.hold.clear()  # a long queue: 30 requests behind a held batch
        queued = [asyncio.ensure_future(b.submit([i])) for i in range(30)]
        await asyncio.sleep(0.3)
        engine.hold.set()
        await asyncio.gather(*queued)
        return fresh, [await lone(b) for _ in range(3)]

    fresh, after = asyncio.run(run())
    assert fresh < window + 0.5
    assert max(after) < window + 0.5, after


def test_a_request_whose_client_left_is_dropped_unrun_and_one_running_is_discarded():
    engine = Engine()

    async def run():
        b = batcher(engine, max_images=1, window_s=0)
        engine.hold.clear()
        running_gone, queued_gone = asyncio.Event(), asyncio.Event()
        running = asyncio.ensure_future(b.submit([1], running_gone))
        await asyncio.sleep(0.1)  # [1] is running (held)
        queued = asyncio.ensure_future(b.submit([2], queued_gone))
        kept = asyncio.ensure_future(b.submit([3]))
        await asyncio.sleep(0.05)
        queued_gone.set()
        running_gone.set()
        outcomes = await asyncio.gather(running, queued, return_exceptions=True)
        engine.hold.set()
        return outcomes, await kept

    (running, queued), kept = asyncio.run(run())
    assert isinstance(running, ClientGone) and running.started
    assert isinstance(queued, ClientGone) and not queued.started
    assert kept == [30]
    assert engine.batches == [[1], [3]]  # [2] never reached the engine


def test_a_request_cancelled_by_its_deadline_is_dropped_unrun():
    engine = Engine()

    async def run():
        b = batcher(engine, max_images=1, window_s=0)
        engine.hold.clear()
        first = asyncio.ensure_future(b.submit([1]))
        await asyncio.sleep(0.1)
        late = asyncio.ensure_future(b.submit([2]))
        await asyncio.sleep(0.05)
        late.cancel()  # what the server's timeout does to a request past its deadline
        engine.hold.set()
        await first
        return await b.submit([3])

    assert asyncio.run(run()) == [30]
    assert engine.batches == [[1], [3]]


# --- admission: caps and work


def body(*entries: dict) -> bytes:
    return json.dumps({"requests": list(entries)}).encode()


def test_the_demand_of_a_body_counts_entries_images_and_work():
    one = {"prompt": "x", "width": 1024, "height": 512, "steps": 20, "num_images": 3}
    assert measure("/generate", body(one, {"prompt": "y"})) == Demand(
        items=2, images=4, work=3 * 20 * 0.5 + 1 * 30 * 1.0
    )
    assert measure("/score", body({"images": ["a", "b"]}, {"images": ["c"]})) == Demand(2, 3)
    # Values validation will refuse count as their defaults or limits, never crash here.
    odd = {"steps": "many", "width": 10**9, "num_images": -4}
    assert measure("/generate", body(odd)) == Demand(1, 1, 1 * 30 * 4096 * 1024 / 1024**2)
    assert measure("/generate", b"not json") == Demand()
    assert measure("/generate", b'{"requests": 3}') == Demand()


def test_caps_name_the_setting():
    limits = RequestLimits(max_items=16, max_images=32, max_work=100)
    assert "BENTOLORA_MAX_REQUEST_ITEMS" in over_cap(Demand(17, 17, 1), limits)
    assert "BENTOLORA_MAX_REQUEST_IMAGES" in over_cap(Demand(5, 40, 1), limits)
    assert "BENTOLORA_MAX_QUEUE_WORK" in over_cap(Demand(1, 1, 101), limits)
    assert over_cap(Demand(16, 32, 100), limits) == ""


async def call(app, path: str, payload: bytes, then_disconnect: asyncio.Event | None = None):
    """Run `app` for one POST with `payload`; after the body, the client's disconnect comes when
    `then_disconnect` is set (never without it). What it sent."""
    sent = []
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": payload, "more_body": False}
        if then_disconnect is None:
            await asyncio.sleep(3600)
        await then_disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    await app(scope, receive, send)
    return sent


def status(sent) -> int:
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


class Held:
    """An app that holds each request until released, then answers 200."""

    def __init__(self):
        self.release = asyncio.Event()
        self.gone: list[bool] = []

    async def __call__(self, scope, receive, send):
        gone = scope[CLIENT_GONE]
        await asyncio.wait(
            [asyncio.ensure_future(self.release.wait()), asyncio.ensure_future(gone.wait())],
            return_when=asyncio.FIRST_COMPLETED,
        )
        self.gone.append(gone.is_set())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


SMALL = {"prompt": "x", "width": 512, "height": 512, "steps": 10}  # 2.5 units of work


def test_admission_counts_work_not_requests():
    async def run():
        app = Held()
        admission = Admission(
            app, max_queue=64, live=LiveStatus(), limits=RequestLimits(16, 32, 10)
        )
        first = asyncio.ensure_future(call(admission, "/generate", body(SMALL, SMALL, SMALL)))
        await asyncio.sleep(0.05)  # 7.5 units in flight
        refused = await call(admission, "/generate", body(SMALL, SMALL))  # 5 more: over 10
        fits = asyncio.ensure_future(call(admission, "/generate", body(SMALL)))  # 2.5: fits
        too_big = await call(admission, "/generate", body(*[SMALL] * 5))  # 12.5 > 10 ever
        await asyncio.sleep(0.05)
        in_flight = admission.work["/generate"]
        app.release.set()
        await asyncio.gather(first, fits)
        return refused, too_big, in_flight, admission.work["/generate"]

    refused, too_big, in_flight, after = asyncio.run(run())
    assert status(refused) == 429
    assert "BENTOLORA_MAX_QUEUE_WORK" in json.loads(refused[-1]["body"])["error"]
    assert any(k == b"retry-after" for k, _ in refused[0]["headers"])
    assert status(too_big) == 400
    assert in_flight == 10.0 and after == 0.0


def test_a_disconnect_after_the_body_reaches_the_request_as_client_gone():
    async def run():
        app = Held()
        admission = Admission(app, max_queue=64, live=LiveStatus())
        leave = asyncio.Event()
        request = asyncio.ensure_future(call(admission, "/generate", body(SMALL), leave))
        await asyncio.sleep(0.05)
        leave.set()
        await asyncio.wait_for(request, 5)
        return app.gone, admission.in_flight["/generate"]

    assert asyncio.run(run()) == ([True], 0)


@pytest.mark.parametrize("path", ["/generate", "/score"])
def test_too_many_entries_are_refused_before_any_parser(path):
    async def run():
        app = Held()
        admission = Admission(app, max_queue=64, live=LiveStatus(), limits=RequestLimits(16, 32))
        entry = SMALL if path == "/generate" else {"images": ["x"]}
        return app, await call(admission, path, body(*[entry] * 5000))

    app, sent = asyncio.run(run())
    assert status(sent) == 400 and app.gone == []
    assert "5000 entries" in json.loads(sent[-1]["body"])["error"]


def test_the_engine_skips_the_images_of_a_request_whose_client_has_gone():
    """A batch that began before a client left computes none of that request's images that
    have not started (the engine checks before each pipeline call)."""
    from service.engine import wanted
    from service.schemas import GenerateRequest

    kept, left = GenerateRequest(prompt="a", num_images=2), GenerateRequest(prompt="b")
    left._gone = asyncio.Event()
    assert wanted([kept, left], [(0, 0), (0, 1), (1, 0)], 60) == [(0, 0), (0, 1), (1, 0)]
    left._gone.set()
    assert left.client_gone and not kept.client_gone
    assert wanted([kept, left], [(0, 0), (0, 1), (1, 0)], 60) == [(0, 0), (0, 1)]

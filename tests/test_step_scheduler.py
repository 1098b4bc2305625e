"""Continuous batching at denoising-step granularity (BENTOLORA_SCHEDULING=step, issue 17).

The peer for every image is the same request served alone by the request-level path, which is
one plain diffusers pipeline call (itself checked against diffusers in test_service.py)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from test_mixed_adapters import adapters  # noqa: F401 - the module's adapter fixture

from service import batcher
from service.engine import Engine
from service.schemas import GenerateRequest
from service.settings import Settings
from service.step_scheduler import StepQueue
from tests.service_helpers import response_pixels


def engine(**options) -> Engine:
    return Engine(Settings(base="sdxl-tiny", clip="clip-tiny", device="cpu", ui=False, **options))


def request(i: int, **fields) -> GenerateRequest:
    chosen = fields.pop("adapters", [])
    return GenerateRequest(
        prompt=f"a circle number {i}",
        width=64,
        height=64,
        seed=500 + i,
        adapters=[{"name": n, "scale": s} for n, s in chosen],
        **fields,
    )


# Staggered: each row arrives while the ones before it are denoising.
MIXED = [
    {"steps": 4},
    {"steps": 6, "scheduler": "euler_a", "adapters": [("mix-a", 0.8)]},
    {"steps": 8, "scheduler": "dpmpp_2m_karras", "guidance": 1.0},
    {"steps": 4, "scheduler": "ddim", "negative_prompt": "blue", "adapters": [("mix-te", 1.0)]},
    {"steps": 6, "scheduler": "unipc", "guidance": 7.5, "adapters": [("mix-b", -0.5)]},
    {"steps": 8, "adapters": [("mix-a", 0.5), ("mix-b", 0.5)], "num_images": 2},
    {"steps": 4, "scheduler": "euler_a", "guidance": 0.0},
]


def mid_flight(stepped: Engine, timeout_s: float = 60) -> None:
    """Wait until some image is past its first step and not finished."""
    deadline = time.monotonic() + timeout_s
    while not any(0 < done < total for done, total in stepped.steps.in_flight()):
        assert time.monotonic() < deadline, "nothing in flight"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def alone(adapters):  # noqa: F811
    served = engine()
    return [response_pixels(served.generate([request(i, **f)])[0]) for i, f in enumerate(MIXED)]


def test_each_image_equals_its_request_alone_whatever_joins_or_leaves(alone):
    stepped = engine(scheduling="step", max_batch_images=4)
    futures = []
    for i, fields in enumerate(MIXED):
        if i % 3:  # arrivals in threes; the first of each three comes mid-flight
            mid_flight(stepped)
        futures.append(stepped.submit([request(i, **fields)]))
    responses = [f.result(timeout=300)[0] for f in futures]
    for i, response in enumerate(responses):
        got = response_pixels(response)
        assert len(got) == len(alone[i])
        for g, want in zip(got, alone[i], strict=True):
            assert np.abs(g - want).max() <= 2, MIXED[i]
    timings = [image.timings for r in responses for image in r.images]
    # Images shared steps with images of other requests (joined the running batch)...
    assert max(t["batch_images"] for t in timings) == 4  # ...up to the limit
    assert max(t["batch_adapter_sets"] for t in timings) > 1  # ...with different adapters
    assert stepped.steps.buckets == [1, 2, 4]


def test_a_request_arriving_mid_batch_does_not_wait_for_it(adapters):  # noqa: F811
    stepped = engine(scheduling="step", max_batch_images=4)
    long = stepped.submit([request(0, steps=40)])
    mid_flight(stepped)
    started = time.perf_counter()
    short = stepped.submit([request(1, steps=2)])
    [response] = short.result(timeout=300)
    assert not long.done()  # the short one finished while the long one still denoises
    assert response.images[0].timings["batch_images"] == 2
    long.result(timeout=300)
    assert time.perf_counter() - started > 0


def test_a_client_that_leaves_stops_costing_steps_at_the_next_step(adapters):  # noqa: F811
    stepped = engine(scheduling="step", max_batch_images=4)
    gone = threading.Event()
    leaving = request(0, steps=150)
    leaving._gone = gone
    staying = request(1, steps=30)
    futures = [stepped.submit([leaving]), stepped.submit([staying])]
    time.sleep(0.5)
    gone.set()
    [dropped] = futures[0].result(timeout=120)
    assert dropped.images == []  # retired before its 150 steps
    [kept] = futures[1].result(timeout=120)
    assert len(kept.images) == 1


def test_a_request_past_its_deadline_is_dropped_unrun(adapters):  # noqa: F811
    stepped = engine(scheduling="step", request_timeout_s=1)
    late = request(0, steps=4)
    late._received -= 5
    [response] = stepped.submit([late]).result(timeout=120)
    assert response.images == []


def test_the_service_feeds_the_scheduler_directly(adapters):  # noqa: F811
    import asyncio

    stepped = engine(scheduling="step")
    batches = batcher.for_engine(stepped, stepped.settings)
    assert isinstance(batches.generate, StepQueue)

    async def two():
        return await asyncio.gather(
            batches.generate.submit([request(0, steps=3)]),
            batches.generate.submit([request(1, steps=3)]),
        )

    first, second = asyncio.run(two())
    assert len(first[0].images) == len(second[0].images) == 1


def test_scheduling_setting_is_checked():
    with pytest.raises(ValueError, match="BENTOLORA_SCHEDULING='tokens' is not one of"):
        Settings.from_env({"BENTOLORA_SCHEDULING": "tokens"})


@pytest.mark.slow
def test_compiled_step_scheduler_never_recompiles_as_the_batch_changes(adapters):  # noqa: F811
    from torch._dynamo.utils import counters

    stepped = engine(scheduling="step", compile="blocks", warmup=True, max_batch_images=4)
    stepped.generate([request(9, steps=2, adapters=[("mix-a", 1.0)])])  # the adapter's load
    before = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        futures = []
        for i, fields in enumerate(MIXED):
            if i % 3:
                mid_flight(stepped)
            futures.append(stepped.submit([request(i, **fields)]))
        for future in futures:
            future.result(timeout=600)
    assert counters["stats"]["unique_graphs"] == before


def test_an_adapter_loads_beside_the_steps(adapters, monkeypatch):  # noqa: F811
    stepped = engine(scheduling="step")
    assert not stepped.adapters.resident(((adapters["b"], 1.0),))
    monkeypatch.setenv("BENTOLORA_FAILPOINTS", "adapter.load=hang")
    loading = stepped.submit([request(0, steps=3, adapters=[("mix-b", 1.0)])])
    [plain] = stepped.submit([request(1, steps=3)]).result(timeout=120)
    assert len(plain.images) == 1 and not loading.done()  # the other stepped meanwhile
    monkeypatch.delenv("BENTOLORA_FAILPOINTS")
    [loaded] = loading.result(timeout=120)
    assert loaded.images[0].adapters[0].name == "mix-b"

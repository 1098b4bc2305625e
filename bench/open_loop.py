"""Open-loop load: request-level batching against the step scheduler, same arrivals (issue 17).

An open-loop generator sends requests at Poisson arrival times whatever the server's state (a
closed loop, with a fixed number in flight, would slow down with the server and hide queueing).
Per mode, in one process over the service's own entry (service.batcher.for_engine: the Batcher
feeding Engine.generate, or the step scheduler's queue):
- one request alone (its latency is the reference for the p95 target);
- saturation: 2 × BENTOLORA_MAX_BATCH_IMAGES requests at once (images/s);
- Poisson arrivals at each load fraction of the REQUEST-LEVEL saturation throughput, the same
  arrival times (seeded) for both modes, a fixed number of requests: throughput and p50/p95/p99
  of arrival-to-answer latency.
Requests take the bench's adapters in turn, so batches mix adapter sets.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import replace

from bench.measure import Row, peak_memory, percentile, reset_peak
from bench.pipelines import Workload, engine_requests, make_engine

log = logging.getLogger(__name__)

MODES = ("request", "step")


def open_loop_rows(
    device: str,
    batch: int,
    work: Workload,
    adapters: list[str],
    loads: list[float],
    requests: int,
    speed: dict | None = None,
) -> list[Row]:
    """The rows above for both modes (`speed`: the engine's speed settings)."""
    from service.batcher import for_engine

    rows: list[Row] = []
    capacity: list[float] = []  # the request-level path's: the same offered load for both
    for mode in MODES:
        engine, _ = make_engine(device, batch, {**(speed or {}), "scheduling": mode})
        try:
            entry = for_engine(engine, engine.settings).generate
            make = _request_maker(work, adapters)
            reset_peak(device)
            mode_rows = asyncio.run(_mode_rows(mode, entry, make, batch, loads, requests, capacity))
            memory, kind = peak_memory(device)
            for row in mode_rows:
                row.peak_memory_gb, row.memory_kind = memory, kind
            rows += mode_rows
        finally:
            if engine.steps is not None:
                engine.steps.stop()
            del engine
    for row in rows:  # each step row against the same request-level row
        if row.extra["mode"] == "step":
            row.baseline = row.name.replace(", step,", ", request,")
    return rows


async def _mode_rows(mode, entry, make, batch, loads, requests, capacity) -> list[Row]:
    """One mode's rows, in one event loop (the batcher's queue belongs to it)."""
    await _closed(entry, make, 1)  # warm-up: the first call, the adapters' loads
    [alone] = await _closed(entry, make, 1)
    rows = [_row(f"open loop, {mode}, one request alone", [alone], alone, 1, mode)]
    burst = 2 * batch
    latencies, wall = await _timed_closed(entry, make, burst)
    rows.append(
        _row(f"open loop, {mode}, saturation ({burst} at once)", latencies, wall, burst, mode)
    )
    if not capacity:
        capacity.append(burst / wall)
    for load in loads:
        rate = load * capacity[0]
        arrivals = _poisson(rate, requests, seed=int(load * 1000))
        latencies, wall = await _open(entry, make, arrivals)
        row = _row(f"open loop, {mode}, {load:.0%} load", latencies, wall, requests, mode)
        row.extra["offered_requests_s"] = round(rate, 4)
        row.extra["p95_over_alone"] = row.latency(95) / alone
        rows.append(row)
        log.info("%s: p95 %.3f s (alone %.3f s)", row.name, row.latency(95), alone)
    return rows


def _row(name: str, latencies: list[float], wall: float, images: int, mode: str) -> Row:
    row = Row("open loop", name, images=images, seconds=wall, latencies=sorted(latencies))
    row.extra = {"mode": mode, "p99_s": percentile(latencies, 99)}
    return row


def _request_maker(work: Workload, adapters: list[str]):
    counter = iter(range(10**9))

    def make():
        i = next(counter)
        [request] = engine_requests(
            replace(work), 1, adapters[i % len(adapters)] if adapters else None
        )
        request.seed = 1000 + i
        return request

    return make


def _poisson(rate: float, count: int, seed: int) -> list[float]:
    """`count` arrival times (seconds from the start) of a Poisson process of `rate`/s."""
    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        times.append(t)
    return times


async def _one(entry, request) -> float:
    started = time.perf_counter()
    await entry.submit([request])
    return time.perf_counter() - started


async def _closed(entry, make, count: int) -> list[float]:
    return list(await asyncio.gather(*(_one(entry, make()) for _ in range(count))))


async def _timed_closed(entry, make, count: int) -> tuple[list[float], float]:
    started = time.perf_counter()
    latencies = await _closed(entry, make, count)
    return latencies, time.perf_counter() - started


async def _open(entry, make, arrivals: list[float]) -> tuple[list[float], float]:
    started = time.perf_counter()

    async def at(offset: float) -> float:
        await asyncio.sleep(max(0.0, started + offset - time.perf_counter()))
        return await _one(entry, make())

    latencies = await asyncio.gather(*(at(t) for t in arrivals))
    return list(latencies), time.perf_counter() - started

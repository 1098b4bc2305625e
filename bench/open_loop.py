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

`http_open_loop_rows` measures the same over HTTP against a real `bentoml serve` per entry
(--open-loop-where http|both): request-level batching (the service's Batcher), the step
scheduler behind the async /generate (BENTOLORA_STEP_ENTRY=async) and behind BentoML's
batchable /generate (BENTOLORA_STEP_ENTRY=batchable), each load a fraction of the
least of the three servers' saturation throughputs (4 × batch requests at once), the same
seeded arrivals for all three. The three servers are up together and measured in turn, phase
by phase.
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


HTTP_ENTRIES = {
    "request": {"scheduling": "request"},
    "step async": {"scheduling": "step", "step_entry": "async"},
    "step batchable": {"scheduling": "step", "step_entry": "batchable"},
}
"""Row label -> the server's settings, for the HTTP open-loop rows."""
HTTP_WARMUP = 12
"""Requests one at a time before measuring: the adapters' first loads, and BentoML's batchable
dispatcher's training phase (its first ~11 batches, one request each)."""


def http_open_loop_rows(
    device: str,
    batch: int,
    work: Workload,
    adapters: list[str],
    loads: list[float],
    requests: int,
    log_dir,
    timeout_s: float,
    speed: dict | None = None,
) -> list[Row]:
    """The rows above over HTTP, a server per entry in HTTP_ENTRIES, all up at once and measured
    in turn phase by phase (alone, saturation, each load: request-level, then the two step
    entries), so a change in what else the machine runs hits every entry alike."""
    from bench import server

    procs, urls, cold = [], {}, {}
    try:
        for mode, settings in HTTP_ENTRIES.items():
            log_path = log_dir / f"server-open-loop-{mode.replace(' ', '-')}.log"
            proc, urls[mode], cold[mode] = server.start(
                device, batch, log_path, timeout_s, {**(speed or {}), **settings}
            )
            procs.append(proc)
        with server.MemorySampler(procs[-1].pid, device) as memory:
            rows = asyncio.run(_http_rows(urls, work, adapters, batch, loads, requests))
    finally:
        for proc in procs:
            server.stop(proc)
    for row in rows:
        mode = row.extra["mode"]
        row.warmup_s = cold[mode]
        # One server's tree (the last's: the batchable entry's) on a CPU; in use on the GPU.
        row.peak_memory_gb, row.memory_kind = memory.peak / 2**30, memory.kind()
        if mode != "request":  # each step row against the request-level row of the same load
            row.baseline = row.name.replace(f", {mode},", ", request,")
    return rows


async def _http_rows(urls, work, adapters, batch, loads, requests) -> list[Row]:
    import httpx

    from bench.server import body

    counter = iter(range(10**9))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=900.0, limits=limits) as client:

        async def one(url: str) -> tuple[float, list[dict]]:
            started = time.perf_counter()
            response = await client.post(
                url + "/generate", json=body(work, next(counter), adapters)
            )
            response.raise_for_status()
            timings = [image["timings"] for image in response.json()[0]["images"]]
            return time.perf_counter() - started, timings

        async def many(url: str, arrivals: list[float]):
            started = time.perf_counter()

            async def at(offset: float):
                await asyncio.sleep(max(0.0, started + offset - time.perf_counter()))
                return await one(url)

            done = await asyncio.gather(*(at(t) for t in arrivals))
            wall = time.perf_counter() - started
            return [d[0] for d in done], wall, [t for d in done for t in d[1]]

        for url in urls.values():
            for _ in range(HTTP_WARMUP):
                await one(url)
        rows: list[Row] = []
        alone: dict[str, float] = {}
        for mode, url in urls.items():
            [alone[mode]], _, timings = await many(url, [0.0])
            name = f"open loop HTTP, {mode}, one request alone"
            rows.append(_http_row(name, [alone[mode]], alone[mode], 1, mode, timings))
        burst = 4 * batch
        saturation = []
        for mode, url in urls.items():
            latencies, wall, timings = await many(url, [0.0] * burst)
            name = f"open loop HTTP, {mode}, saturation ({burst} at once)"
            rows.append(_http_row(name, latencies, wall, burst, mode, timings))
            saturation.append(burst / wall)
        # The least of the entries' saturation throughputs: the same arrivals for all, and at
        # 90% none is offered more than it serves (over HTTP on a CPU the step scheduler's is
        # the lower one).
        capacity = min(saturation)
        for load in loads:
            arrivals = _poisson(load * capacity, requests, seed=int(load * 1000))
            for mode, url in urls.items():
                latencies, wall, timings = await many(url, arrivals)
                name = f"open loop HTTP, {mode}, {load:.0%} load"
                row = _http_row(name, latencies, wall, requests, mode, timings)
                row.extra["offered_requests_s"] = round(load * capacity, 4)
                row.extra["p95_over_alone"] = row.latency(95) / alone[mode]
                rows.append(row)
                log.info("%s: p95 %.3f s (alone %.3f s)", name, row.latency(95), alone[mode])
        return rows


def _http_row(name, latencies, wall, images, mode, timings) -> Row:
    """An HTTP row, with what the server's timings say of its batches: the most images that
    shared a step (or a pipeline call) and the most requests' entries one batch held."""
    row = _row(name, latencies, wall, images, mode)
    row.section = "open loop"
    row.extra["batch_images_max"] = max((t.get("batch_images", 0) for t in timings), default=0)
    row.extra["batch_requests_max"] = max((t.get("batch_requests", 0) for t in timings), default=0)
    return row

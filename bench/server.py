"""The real service over HTTP on loopback: start `bentoml serve`, drive it with bounded load."""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import threading
import time
from pathlib import Path

import httpx
import psutil
import torch

from bench.fixtures import BASE, CLIP
from bench.measure import Row, percentile
from bench.pipelines import PROMPT, SEED, Workload, decode_png
from service import launch

log = logging.getLogger(__name__)


def start(
    device: str, batch: int, log_path: Path, timeout_s: float, speed: dict | None = None
) -> tuple:
    """(process, url, seconds to ready) of `bentoml serve` on the benchmark store; `speed`:
    Settings fields (compile, warmup, …) passed as BENTOLORA_* variables."""
    env = {
        **os.environ,
        "BENTOLORA_BASE": BASE,
        "BENTOLORA_CLIP": CLIP,
        "BENTOLORA_DEVICE": device,
        "BENTOLORA_MAX_BATCH_IMAGES": str(batch),
        "BENTOLORA_MAX_PIXELS": str(4096 * 4096),
        "BENTOLORA_UI": "0",
    }
    for key, value in (speed or {}).items():
        env[f"BENTOLORA_{key.upper()}"] = "1" if value is True else str(value)
    return launch.start(env, log_path, timeout_s)


stop = launch.stop


class MemorySampler:
    """Peak memory while load runs: GPU memory in use on the device (the server is another
    process) on CUDA, else the summed RSS of the server's process tree."""

    def __init__(self, pid: int, device: str, every_s: float = 0.1):
        self.pid, self.device, self.every_s = pid, device, every_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def kind(self) -> str:
        return "device memory in use" if self.device.startswith("cuda") else "server tree RSS"

    def _sample(self) -> int:
        if self.device.startswith("cuda"):
            free, total = torch.cuda.mem_get_info()
            return total - free
        try:
            root = psutil.Process(self.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.every_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def body(work: Workload, index: int, adapters: list[str]) -> dict:
    """The HTTP body of request `index`: its own seed, adapters taken in turn, so requests
    batched together use different adapters."""
    request = {
        "prompt": PROMPT,
        "width": work.size,
        "height": work.size,
        "steps": work.steps,
        "guidance": work.guidance,
        "seed": SEED + index,
    }
    if adapters:
        request["adapters"] = [{"name": adapters[index % len(adapters)], "scale": 1.0}]
    return {"requests": [request]}


async def _load(url: str, work: Workload, concurrency: int, total: int, adapters: list[str]):
    """Send `total` requests, at most `concurrency` in flight; (latencies, wall seconds, the
    server's timings of each image)."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    timings: list[dict] = []
    timeout = httpx.Timeout(900.0)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def one(index: int) -> None:
            async with gate:
                t0 = time.perf_counter()
                response = await client.post("/generate", json=body(work, index, adapters))
                response.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                timings.extend(image["timings"] for image in response.json()[0]["images"])

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(total)))
        return latencies, time.perf_counter() - started, timings


def first_images(url: str, work: Workload, n: int, adapter: str | None) -> list:
    """Images for seeds SEED.. one request each, to compare with the eager baseline."""
    images = []
    for i in range(n):
        request = body(work, i, [adapter] if adapter else [])
        response = httpx.post(url + "/generate", json=request, timeout=900.0)
        response.raise_for_status()
        images.append(decode_png(response.json()[0]["images"][0]["image"]))
    return images


def warm_up(url: str, work: Workload, count: int, adapters: list[str]) -> float:
    """Send `count` requests one at a time before measuring; returns the seconds they took.

    They keep first-call costs (CUDA and cuDNN set-up, a compilation the warm-up missed, the
    adapters' first load) out of the measured rows. The service's own batcher has a fixed window
    and learns nothing from them (service/batcher.py).
    """
    started = time.perf_counter()
    asyncio.run(_load(url, work, 1, count, adapters))
    return time.perf_counter() - started


def http_rows(
    url: str,
    pid: int,
    work: Workload,
    device: str,
    concurrencies: list[int],
    requests: int,
    adapters: list[str],
    mixes: list[int] = (),
) -> list[Row]:
    """One row per concurrency: `max(requests, concurrency)` requests with two adapters taken in
    turn; then, at the largest concurrency, one row per k in `mixes` with k distinct adapters in
    the traffic (each k > 1 row's ratio against the k = 1 row)."""
    rows = []
    plans = [(c, adapters[:2]) for c in concurrencies]
    plans += [(max(concurrencies), adapters[:k]) for k in mixes]
    for concurrency, used in plans:
        total = max(requests, concurrency)
        t0 = time.perf_counter()
        # Warm-up: each adapter of the row loaded once before the timed requests.
        asyncio.run(_load(url, work, concurrency, max(min(concurrency, total), len(used)), used))
        warmup = time.perf_counter() - t0
        with MemorySampler(pid, device) as sampler:
            latencies, wall, timings = asyncio.run(_load(url, work, concurrency, total, used))
        row = Row(
            "http",
            f"HTTP service, concurrency {concurrency}, {len(used) or 'no'} adapters mixed",
            images=total,
            seconds=wall,
            latencies=sorted(latencies),
            warmup_s=warmup,
            peak_memory_gb=sampler.peak / 2**30,
            memory_kind=sampler.kind(),
            extra={
                "requests": total,
                "concurrency": concurrency,
                "server_pipeline_s_p50": percentile([t["pipeline_s"] for t in timings], 50),
                "server_batch_images_mean": statistics.fmean(t["batch_images"] for t in timings),
            },
        )
        log.info("%s: %.3f images/s", row.name, row.images_per_s)
        if len(used) > 1 and 1 in mixes and concurrency == max(concurrencies):
            row.baseline = f"HTTP service, concurrency {concurrency}, 1 adapters mixed"
        if all(r.name != row.name for r in rows):
            rows.append(row)
    return rows

"""The service's own Prometheus metrics, beside BentoML's (all on /metrics).

Created on first use, inside the server process, where BentoML has set up its registry.

The metrics live in files per process (Prometheus multiprocess mode). A gauge of a worker that
was killed stayed in /metrics with its last value (a queue depth of 8 for ever), since BentoML
never marks such a process dead: `start_worker` does, for every dead process, when a worker
starts, and the gauges that count what is in flight are summed over live processes only.
(BentoML's HTTP metrics are labelled by route, not path: see service.bentoml_fixes.)
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)


@functools.cache
def _metrics():
    import bentoml

    return {
        "refused": bentoml.metrics.Counter(
            name="bentolora_refused_total",
            documentation="Requests refused with 429 because the endpoint's queue was full",
            labelnames=["endpoint"],
        ),
        "queue": bentoml.metrics.Gauge(
            name="bentolora_queue_depth",
            documentation="Requests waiting or running, per endpoint",
            labelnames=["endpoint"],
            multiprocess_mode="livesum",
        ),
        "dropped": bentoml.metrics.Counter(
            name="bentolora_dropped_total",
            documentation="Requests dropped before the GPU because their deadline had passed",
        ),
        "images": bentoml.metrics.Counter(
            name="bentolora_pipeline_images_total",
            documentation="Images the pipeline computed",
        ),
        "oom": bentoml.metrics.Counter(
            name="bentolora_oom_total",
            documentation="Pipeline calls that ran out of GPU memory (then split or refused)",
        ),
        "batch": bentoml.metrics.Histogram(
            name="bentolora_batch_requests",
            documentation="Requests per batch the engine ran, per endpoint",
            labelnames=["endpoint"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        ),
        "abandoned": bentoml.metrics.Counter(
            name="bentolora_abandoned_total",
            documentation="Requests whose client disconnected before their answer, by whether "
            "their work had started (dropped unrun when not)",
            labelnames=["endpoint", "started"],
        ),
    }


def refused(endpoint: str) -> None:
    _metrics()["refused"].labels(endpoint=endpoint).inc()


def queue_depth(endpoint: str, depth: int) -> None:
    _metrics()["queue"].labels(endpoint=endpoint).set(depth)


def dropped(count: int = 1) -> None:
    _metrics()["dropped"].inc(count)


def images(count: int) -> None:
    _metrics()["images"].inc(count)


def oom() -> None:
    _metrics()["oom"].inc()


def batch_requests(endpoint: str, count: int) -> None:
    _metrics()["batch"].labels(endpoint=endpoint).observe(count)


def abandoned(endpoint: str, started: bool) -> None:
    _metrics()["abandoned"].labels(endpoint=endpoint, started=str(started).lower()).inc()


def start_worker(endpoints=("/generate", "/score")) -> list[int]:
    """At a worker's start: forget the live gauges of dead processes (a worker killed with
    requests in flight left its queue depth behind), and show this worker's queues as empty.
    Returns the dead processes' ids."""
    dead = forget_dead_processes()
    if dead:
        log.info("gauges of dead worker process(es) %s reset", dead)
    for endpoint in endpoints:
        queue_depth(endpoint, 0)
    return dead


LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]*_(\d+)\.db")


def forget_dead_processes(directory: str | None = None) -> list[int]:
    """prometheus_client's `mark_process_dead` for every process whose live-gauge files are in
    the multiprocess directory but which no longer runs. Counters and histograms are kept."""
    import prometheus_client.multiprocess
    import psutil

    directory = directory or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory or not Path(directory).is_dir():
        return []
    pids = {
        int(match[1])
        for path in Path(directory).iterdir()
        if (match := LIVE_GAUGE_FILE.fullmatch(path.name))
    }
    dead = sorted(pid for pid in pids if not _running(pid, psutil))
    for pid in dead:
        prometheus_client.multiprocess.mark_process_dead(pid, directory)
    return dead


def _running(pid: int, psutil) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False

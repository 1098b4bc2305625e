"""The service's own Prometheus metrics, beside BentoML's (all on /metrics).

Created on first use, inside the server process, where BentoML has set up its registry.
"""

from __future__ import annotations

import functools


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

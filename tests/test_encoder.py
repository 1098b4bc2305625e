"""Image encoding in worker processes (BENTOLORA_ENCODE_WORKERS): the same bytes as inline, and
a dead worker loses no image."""

from __future__ import annotations

import os
import signal

import numpy as np
import psutil
import pytest
from PIL import Image

from service.encoder import Encoder
from service.images import encode


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)) for _ in range(4)]


@pytest.fixture
def pool():
    encoder = Encoder(2)
    encoder.start()
    yield encoder
    encoder.close()


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_workers_give_the_bytes_inline_encoding_gives(pool, images, fmt):
    pending = [pool.submit(image, fmt) for image in images]
    results = [p.result() for p in pending]
    assert [text for text, _ in results] == [encode(image, fmt) for image in images]
    assert all(seconds > 0 for _, seconds in results)


def test_no_workers_encodes_inline(images):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    encoder = Encoder(0)
    assert encoder.submit(images[0], "png").result()[0] == encode(images[0], "png")
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def test_a_dead_worker_loses_no_image_and_the_pool_is_replaced(pool, images):
    workers = list(pool._pool._processes.values())
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker.pid, signal.SIGKILL)
    for worker in workers:
        worker.join(timeout=10)
    pending = [pool.submit(image, "png") for image in images]
    assert [p.result()[0] for p in pending] == [encode(image, "png") for image in images]
    after = [pool.submit(image, "png") for image in images]  # the new pool works
    assert [p.result()[0] for p in after] == [encode(image, "png") for image in images]
    assert all(w.pid not in {p.pid for p in pool._pool._processes.values()} for w in workers)


def test_closing_leaves_no_process_behind(images):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    encoder = Encoder(2)
    encoder.submit(images[0], "png").result()
    children = [
        p
        for p in psutil.Process().children(recursive=True)
        # multiprocessing's resource tracker lives as long as this process, pool or not
        if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline())
    ]
    assert children
    encoder.close()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive

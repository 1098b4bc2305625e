"""Generated images to PNG/JPEG/WebP text, off the thread that drives the GPU.

PIL's PNG encoder holds the GIL (about 0.15 s for a 1024² image on one core; measured: two
threads encode no faster than one), so encoding a batch of 8 inline stalls the next pipeline
call's kernel launches for over a second. With BENTOLORA_ENCODE_WORKERS=N the raw pixels go to
N worker processes, and the engine collects the results after it has started the next group of
the batch. A worker that dies (killed, out of memory) costs nothing but speed: that image is
encoded inline and a fresh pool replaces the broken one.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from PIL import Image

from service.images import encode

log = logging.getLogger(__name__)


def _timed_encode(image: Image.Image, fmt: str) -> tuple[str, float]:
    started = time.perf_counter()
    text = encode(image, fmt)
    return text, time.perf_counter() - started


def _encode_pixels(data: bytes, mode: str, size: tuple[int, int], fmt: str) -> tuple[str, float]:
    """In a worker: the raw pixels (cheaper to send than a pickled image) back into an image."""
    return _timed_encode(Image.frombytes(mode, size, data), fmt)


class Encoded:
    """One image being encoded: `result()` gives (base64 text, seconds spent encoding)."""

    def __init__(self, encoder: Encoder, image: Image.Image, fmt: str, future: Future | None):
        self._encoder, self._image, self._fmt, self._future = encoder, image, fmt, future
        self._pool = encoder._pool

    def result(self) -> tuple[str, float]:
        if self._future is not None:
            try:
                return self._future.result()
            except BrokenProcessPool:
                self._encoder.replace_pool(self._pool)
        return _timed_encode(self._image, self._fmt)


class Encoder:
    def __init__(self, workers: int = 0):
        self.workers = workers
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor | None:
        if not self.workers:
            return None
        # spawn: the serving process holds CUDA state and threads that fork must not copy.
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(self.workers, mp_context=context)

    def submit(self, image: Image.Image, fmt: str) -> Encoded:
        if self._pool is None:
            return Encoded(self, image, fmt, None)
        try:
            future = self._pool.submit(_encode_pixels, image.tobytes(), image.mode, image.size, fmt)
        except (BrokenProcessPool, RuntimeError):  # broken, or shut down
            self.replace_pool(self._pool)
            return Encoded(self, image, fmt, None)
        return Encoded(self, image, fmt, future)

    def start(self) -> None:
        """Start the worker processes now (each imports PIL), not on the first request."""
        if self._pool is not None:
            for future in [self._pool.submit(time.sleep, 0) for _ in range(self.workers)]:
                future.result()

    def replace_pool(self, broken: ProcessPoolExecutor | None) -> None:
        """Replace `broken` (once, however many of its images notice it)."""
        with self._lock:
            if broken is None or self._pool is not broken:
                return
            log.warning("an image encoder process died; starting a new pool")
            old, self._pool = self._pool, self._new_pool()
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

"""Draining on SIGTERM: the worker keeps answering, quickly, until its requests are done.

Left to itself, uvicorn stops accepting at the first SIGTERM: /readyz then times out instead of
failing, and a request sent meanwhile waits unanswered in the listening socket until the server
exits and resets it. With `Drain.take_over_sigterm` (called in the worker at start), a SIGTERM
only marks the server as draining: `RequestGuard` answers /readyz, and every new request, 503 at
once (with `Connection: close`, so load balancers and clients go elsewhere); health and metrics
stay served. When the requests in flight are done (or after `limit_s`), uvicorn's own SIGTERM
handling runs: it stops accepting and exits. A second SIGTERM skips the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)

SERVED_WHILE_DRAINING = frozenset({"/livez", "/healthz", "/metrics"})
"""Answered as usual during a drain: the process is alive, and its metrics are still read."""
UNTRACKED_PREFIXES = ("/ui",)
"""Not waited for: the web UI's page and Gradio's long-lived event streams (its work goes
through /generate, which is waited for)."""


class Drain:
    def __init__(self, limit_s: float = 600.0):
        self.limit_s = limit_s
        """The longest a drain waits for requests in flight (they time out by then anyway)."""
        self.draining = False
        self.in_flight = 0

    def serves_while_draining(self, path: str) -> bool:
        return path in SERVED_WHILE_DRAINING

    @contextlib.contextmanager
    def tracking(self, path: str) -> Iterator[None]:
        """Counts the request at `path` as in flight (what a drain waits for) while inside."""
        if path.startswith(UNTRACKED_PREFIXES) or path in SERVED_WHILE_DRAINING:
            yield
            return
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def take_over_sigterm(self) -> bool:
        """Make SIGTERM start a drain instead of stopping the server at once. Call it in the
        server's main thread, from its event loop, once the server has set its own handler
        (BentoML creates the service instance there: its __init__ is the place). False (and
        nothing changed) anywhere else."""
        if threading.current_thread() is not threading.main_thread():
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        stop_now = signal.getsignal(signal.SIGTERM)

        def on_sigterm(sig: int, frame) -> None:
            if self.draining:  # a second SIGTERM: no more waiting
                return _hand_over(stop_now, sig, frame)
            self.draining = True
            log.info("SIGTERM: draining (%d request(s) in flight), then stopping", self.in_flight)
            loop.call_soon_threadsafe(
                lambda: loop.create_task(self._stop_when_idle(stop_now, sig, frame))
            )

        signal.signal(signal.SIGTERM, on_sigterm)
        return True

    async def _stop_when_idle(self, stop_now, sig: int, frame) -> None:
        started = time.monotonic()
        while self.in_flight and time.monotonic() - started < self.limit_s:
            await asyncio.sleep(0.05)
        log.info("drained in %.1f s; stopping", time.monotonic() - started)
        _hand_over(stop_now, sig, frame)


def _hand_over(handler, sig: int, frame) -> None:
    """What SIGTERM did before the drain took it over: uvicorn's handler, or the default."""
    if callable(handler):
        handler(sig, frame)
    else:
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        signal.raise_signal(sig)

"""Two repairs to the HTTP server BentoML (1.4) builds around the service, applied where the
service is defined (`apply()`, in service/service.py), before BentoML builds its middleware.

Both were found by flooding a server with requests that never reach the API (10,000 GETs to
random paths, all answered 401): memory grew 373 MB and /metrics from 2.3 to 41 MB.

- BentoML's HTTP metrics middleware labels every series with the request's raw path, so each
  distinct path a client sends became new series, for good. `RouteLabelledTrafficMetrics`
  labels with the route that serves the path instead (`/generate`; `/ui` for everything under
  the mounted web UI; `unknown` for paths no route serves).
- BentoML's request timeout schedules a timer per request and never cancels it: each answered
  request stays in memory (about 5 kB: its future and context) until its timeout has passed
  (BENTOLORA_REQUEST_TIMEOUT_S, 600 s). `CancelledTimerTimeout` cancels it when the request
  ends, and also ends the wait when the app returns without answering (a client that left).

Each replaces a class BentoML looks up by name when it builds an app; if that name is gone
(another BentoML release) the repair is skipped with a warning, and tests/test_robust_hostile.py
fails on the memory or /metrics it was guarding.
"""

from __future__ import annotations

import asyncio
import importlib
import logging

from starlette.responses import JSONResponse

log = logging.getLogger(__name__)

UNKNOWN_ROUTE = "unknown"
"""The endpoint label of a request no route serves."""
ORIGINAL_SCOPE = "bentolora.original_scope"


def apply() -> None:
    _replace(
        "bentoml._internal.server.http.instruments",
        "RunnerTrafficMetricsMiddleware",
        _route_labelled,
    )
    _replace("bentoml._internal.server.http.traffic", "TimeoutMiddleware", _cancelled_timer)


def route_label(scope) -> str:
    """The path of the route (or mount) of the app in `scope` that serves this request's path;
    UNKNOWN_ROUTE when none does. One value per route, whatever paths clients send."""
    from starlette.routing import Match

    routes = getattr(getattr(scope.get("app"), "router", None), "routes", ())
    for route in routes:
        try:
            match, _ = route.matches(scope)
        except Exception:  # a route that cannot read this scope does not serve it
            continue
        if match != Match.NONE:
            return getattr(route, "path", "") or UNKNOWN_ROUTE
    return UNKNOWN_ROUTE


def _replace(module_name: str, name: str, make) -> None:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        module = None
    base = getattr(module, name, None)
    if base is None:
        log.warning("BentoML has no %s.%s: that repair is not applied", module_name, name)
        return
    if getattr(base, "repaired_by_bentolora", False):
        return
    setattr(module, name, make(base))


def _route_labelled(base):
    class RouteLabelledTrafficMetrics(base):
        """BentoML's metrics middleware, shown each request's route as its path; the app behind
        it gets the request's own scope back."""

        repaired_by_bentolora = True

        def __init__(self, app, **options):
            async def original(scope, receive, send):
                await app(scope.pop(ORIGINAL_SCOPE, scope), receive, send)

            super().__init__(original, **options)

        async def __call__(self, scope, receive, send):
            if scope["type"] not in ("http", "websocket") or scope["path"] == "/metrics":
                return await super().__call__(scope, receive, send)
            label = route_label(scope)
            if label == scope["path"]:
                return await super().__call__(scope, receive, send)
            await super().__call__({**scope, "path": label, ORIGINAL_SCOPE: scope}, receive, send)

    return RouteLabelledTrafficMetrics


def _cancelled_timer(base):
    class CancelledTimerTimeout(base):
        """BentoML's TimeoutMiddleware (504 when the app has not started answering within
        `timeout` s), with its timer cancelled when the request ends."""

        repaired_by_bentolora = True

        async def __call__(self, scope, receive, send):
            if scope["type"] not in ("http", "websocket"):
                return await self.app(scope, receive, send)
            loop = asyncio.get_running_loop()
            started = loop.create_future()
            timer = loop.call_later(self.timeout, self._set_timer_out, started)

            async def first_send(message) -> None:
                if not started.done():
                    started.set_result(None)
                await send(message)

            app = asyncio.ensure_future(self.app(scope, receive, first_send))
            app.add_done_callback(lambda _: started.done() or started.set_result(None))
            try:
                await started
            except asyncio.TimeoutError:
                if app.cancel():
                    await JSONResponse(
                        {"error": f"Not able to process the request in {self.timeout} seconds"},
                        status_code=504,
                    )(scope, receive, send)
            else:
                await app
            finally:
                timer.cancel()

    return CancelledTimerTimeout

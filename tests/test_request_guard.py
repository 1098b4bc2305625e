"""The request gates in process (the real server's behaviour is in test_robust_hostile.py):
one Content-Type, whole bodies within the body timeout, 503 while draining, SIGTERM starting a
drain, metrics labels by route, and /score images decoded before validation needs them."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import time

from PIL import Image
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from service import images
from service.bentoml_fixes import UNKNOWN_ROUTE, route_label
from service.drain import Drain
from service.predecode import DecodeScoreImages
from service.request_guard import RequestGuard, WholeBody


def scope(path="/generate", headers=(), method="POST") -> dict:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
    }


async def call(app, scope, messages, timeout=5.0):
    """Run `app` with `messages` as the client's body (then nothing more); what it sent."""
    pending = list(messages)
    sent = []

    async def receive():
        if pending:
            return pending.pop(0)
        await asyncio.sleep(3600)  # a client that sends nothing more

    async def send(message):
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), timeout)
    return sent


def status(sent) -> int:
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


class Recorder:
    """An app that reads the whole body and answers 200 with its length."""

    def __init__(self):
        self.bodies = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        await PlainTextResponse(str(len(body)))(scope, receive, send)


def test_two_content_types_are_refused_before_the_app():
    app = Recorder()
    headers = [("content-type", "multipart/form-data"), ("content-type", "application/json")]
    sent = asyncio.run(call(RequestGuard(app, 1000), scope(headers=headers), []))
    assert status(sent) == 400 and app.bodies == []
    assert b"2 Content-Type headers" in sent[-1]["body"]


def test_a_path_with_its_own_cap_takes_bodies_up_to_it_counted_as_they_stream():
    guard = RequestGuard(Recorder(), 10, path_limits={"/adapters/upload": 100})
    chunk = {"type": "http.request", "body": b"x" * 50, "more_body": True}
    last = {"type": "http.request", "body": b"", "more_body": False}
    for path, chunks, want in [
        ("/adapters/upload", [chunk, last], 200),
        ("/adapters/upload/", [chunk, chunk, chunk, last], 413),  # no Content-Length: counted
        ("/generate", [chunk, last], 413),
    ]:
        sent = asyncio.run(call(guard, scope(path=path), chunks))
        assert status(sent) == want, path
    large = scope(path="/adapters/upload", headers=[("content-length", "101")])
    sent = asyncio.run(call(guard, large, []))
    assert status(sent) == 413 and b"request body is over 100 bytes" in sent[-1]["body"]


def test_a_body_not_complete_in_time_is_answered_408_and_never_reaches_the_app():
    app = Recorder()
    head = scope(headers=[("content-length", "100")])
    started = time.perf_counter()
    sent = asyncio.run(
        call(WholeBody(app, 0.3), head, [{"type": "http.request", "body": b"x", "more_body": True}])
    )
    assert 0.3 <= time.perf_counter() - started < 2
    assert status(sent) == 408 and app.bodies == []
    assert (b"connection", b"close") in sent[0]["headers"]


def test_a_whole_body_reaches_the_app_as_sent():
    app = Recorder()
    chunks = [{"type": "http.request", "body": b"ab", "more_body": True}] * 3
    chunks.append({"type": "http.request", "body": b"c", "more_body": False})
    head = scope(headers=[("transfer-encoding", "chunked")])
    sent = asyncio.run(call(WholeBody(app, 5), head, chunks))
    assert status(sent) == 200 and app.bodies == [b"abababc"]


def test_while_draining_health_and_metrics_answer_and_everything_else_gets_503():
    drain = Drain()
    drain.draining = True
    app = Recorder()
    guard = RequestGuard(app, 1000, drain)
    for path in ("/generate", "/score", "/readyz", "/adapters/"):
        sent = asyncio.run(call(guard, scope(path, method="GET"), []))
        assert status(sent) == 503, path
        assert (b"retry-after", b"1") in sent[0]["headers"]
    for path in ("/livez", "/metrics"):
        empty = {"type": "http.request", "body": b"", "more_body": False}
        assert status(asyncio.run(call(guard, scope(path, method="GET"), [empty]))) == 200


def test_sigterm_starts_a_drain_and_stops_the_server_once_nothing_is_in_flight():
    stopped = []
    original = signal.signal(signal.SIGTERM, lambda sig, frame: stopped.append(sig))
    try:

        async def scenario():
            drain = Drain()
            assert drain.take_over_sigterm()
            with drain.tracking("/generate"):
                signal.raise_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                assert drain.draining and stopped == []  # a request in flight: still serving
            await asyncio.sleep(0.3)
            assert stopped == [signal.SIGTERM]  # done: the server's own handler ran

        asyncio.run(scenario())
    finally:
        signal.signal(signal.SIGTERM, original)


def test_metrics_labels_are_routes_never_raw_paths():
    async def nothing(scope, receive, send):
        pass

    inner = Starlette(routes=[Route("/page", nothing)])
    app = Starlette(routes=[Route("/generate", nothing, methods=["POST"]), Mount("/ui", app=inner)])

    def label(path, method="GET"):
        return route_label({**scope(path, method=method), "app": app, "root_path": ""})

    assert label("/generate", "POST") == "/generate"
    assert label("/generate") == "/generate"  # the route, whichever method
    assert label("/ui/page") == "/ui"
    assert label("/nothing-here/12345") == UNKNOWN_ROUTE


def test_score_images_are_decoded_before_the_app_and_handed_to_validation():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, "PNG")
    good, bad = base64.b64encode(buffer.getvalue()).decode(), "bm90IGFuIGltYWdl"
    seen = {}

    async def app(scope, receive, send):  # what the validator does, on the event loop
        body = json.loads((await receive())["body"])
        [request] = body["requests"]
        seen["ready"] = dict(images.PREDECODED.get())
        seen["image"] = images.decode(request["images"][0], max_bytes=1000, max_pixels=100)
        try:
            images.decode(request["images"][1], max_bytes=1000, max_pixels=100)
        except images.ImageInputError as err:
            seen["error"] = str(err)
        await PlainTextResponse("ok")(scope, receive, send)

    body = json.dumps({"requests": [{"images": [good, bad]}]}).encode()
    message = {"type": "http.request", "body": body, "more_body": False}
    sent = asyncio.run(call(DecodeScoreImages(app, 1000, 100), scope("/score"), [message]))
    assert status(sent) == 200
    assert set(seen["ready"]) == {(good, 1000, 100), (bad, 1000, 100)}
    assert seen["image"] is seen["ready"][(good, 1000, 100)]
    assert seen["image"].getpixel((0, 0)) == (1, 2, 3)
    assert "does not decode" in seen["error"]
    assert images.PREDECODED.get() is None  # only for that request

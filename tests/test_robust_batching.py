"""Batching and admission against a real `bentoml serve` on loopback, the tiny models, a CPU
(issue 14, round two, items 1 and 5):

- one request can hold only so many entries and images (400 naming the cap, before any parser);
- admission counts work (images × steps × pixels), not requests;
- after a burst of any shape (a 2,000-entry request, the largest allowed one, plain load), a lone
  request's latency is back within 1.5× its fresh value within 10 s. BentoML's batcher learned
  its wait from past batches: after one such request every lone request waited seconds;
- a client that disconnects is logged as such (499), never a 5xx, and its work is dropped
  before it starts: abandoned requests leave the queue at once, are never computed, and do not
  hold up a drain.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import statistics
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from models.clip import build_tiny_clip, save_clip
from tests.service_helpers import server_env, start_server, stop_server

pytestmark = pytest.mark.slow

MAX_QUEUE_WORK = 8
"""In 1024² image-steps: 8 images of 256² at 16 steps fill it (server_env caps images at 256²)."""
LONE = {"prompt": "a red square", "seed": 1, "width": 64, "height": 64, "steps": 2}
FULL = {"prompt": "full", "seed": 2, "width": 256, "height": 256, "steps": 16, "num_images": 8}


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        found = re.match(rf"{name}(?:\{{([^}}]*)\}})? (\S+)$", line)
        if found and all(f'{k}="{v}"' in (found[1] or "") for k, v in labels.items()):
            total += float(found[2])
    return total


def queue_depth(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return metric_sum(text, "bentolora_queue_depth", endpoint="/generate")


def images_computed(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return metric_sum(text, "bentolora_pipeline_images_total")


def wait_for(condition, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batching")
    save_clip(*build_tiny_clip(0), "clip-tiny", source="tiny:seed=0", reuse_identical=True)
    faults = tmp / "failpoints"
    faults.write_text("")
    env = server_env() | {
        "BENTOLORA_UI": "0",
        "BENTOLORA_MAX_QUEUE_WORK": str(MAX_QUEUE_WORK),
        "BENTOLORA_FAILPOINTS_FILE": str(faults),
    }
    proc, url = start_server(env, tmp / "server.log")
    yield {"url": url, "faults": faults, "log": tmp / "server.log"}
    stop_server(proc)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server["url"], timeout=120) as client:
        yield client


def generate(http, *entries: dict, timeout: float = 120) -> httpx.Response:
    return http.post("/generate", json={"requests": list(entries)}, timeout=timeout)


def test_a_request_over_the_entry_or_image_cap_is_refused_at_once_naming_the_cap(http):
    started = time.perf_counter()
    huge = generate(http, *[LONE] * 10_000)
    huge_s = time.perf_counter() - started
    assert huge.status_code == 400, huge.text[:300]
    assert "10000 entries" in huge.json()["error"]
    assert "BENTOLORA_MAX_REQUEST_ITEMS" in huge.json()["error"]
    many = generate(http, *[LONE] * 17)
    assert many.status_code == 400 and "at most 16" in many.json()["error"]
    images = generate(http, *[LONE | {"num_images": 8}] * 5)
    assert images.status_code == 400
    assert "40 images" in images.json()["error"]
    assert "BENTOLORA_MAX_REQUEST_IMAGES" in images.json()["error"]
    score = http.post("/score", json={"requests": [{"images": ["x"]}] * 17})
    assert score.status_code == 400 and "BENTOLORA_MAX_REQUEST_ITEMS" in score.json()["error"]
    largest = generate(http, *[LONE | {"num_images": 2}] * 16)
    assert largest.status_code == 200 and sum(len(r["images"]) for r in largest.json()) == 32
    print(f"\ncaps: 10,000 entries refused 400 in {huge_s:.3f} s")


def test_admission_counts_work_not_requests(server, http):
    """One request that fills the work bound is running: a one-image request is refused with
    429 (the queue holds one request of 64); one request bigger than the bound, with 400."""
    server["faults"].write_text("pipeline=hang")
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("full", generate(http, FULL)))
    try:
        worker.start()
        assert wait_for(lambda: queue_depth(server["url"]) == 1)
        refused = generate(http, LONE, timeout=10)
        too_big = generate(http, FULL | {"steps": 17}, timeout=10)
    finally:
        server["faults"].write_text("")
        worker.join(120)
    assert refused.status_code == 429, refused.text
    assert "BENTOLORA_MAX_QUEUE_WORK" in refused.json()["error"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert too_big.status_code == 400 and "BENTOLORA_MAX_QUEUE_WORK" in too_big.json()["error"]
    assert outcome["full"].status_code == 200 and len(outcome["full"].json()[0]["images"]) == 8
    assert generate(http, LONE).status_code == 200  # the work has left the queue
    print(f"\nwork: {refused.json()['error']}")


def test_a_request_past_its_own_deadline_is_answered_504_and_its_gpu_work_stops(server, http):
    """`deadline_s`: the pipeline is held (as by a long batch ahead); the request is answered
    504 naming the field once its deadline passes, and when the pipeline goes on, its image
    leaves the call at the first step: it is never decoded."""
    before = images_computed(server["url"])
    server["faults"].write_text("pipeline=hang")
    try:
        started = time.perf_counter()
        late = generate(http, LONE | {"deadline_s": 1, "steps": 50}, timeout=60)
        waited = time.perf_counter() - started
    finally:
        server["faults"].write_text("")
    assert late.status_code == 504, late.text
    assert "deadline_s" in late.json()["error"]
    assert 1 <= waited < 10
    assert generate(http, LONE | {"deadline_s": 60}).status_code == 200
    assert images_computed(server["url"]) == before + 1  # the in-time one's only


def lone_latency(url: str, count: int = 9) -> tuple[float, list[float]]:
    """The median of `count` lone requests sent one after another (and all of them)."""
    times = []
    with httpx.Client(base_url=url, timeout=600) as client:
        for _ in range(count):
            started = time.perf_counter()
            response = client.post("/generate", json={"requests": [LONE]})
            times.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
    return statistics.median(times), times


def burst(url: str, load_s: float = 5.0, clients: int = 16) -> dict:
    """At once: a 2,000-entry request (today: refused; it used to be served, and taught BentoML's
    batcher a wait of seconds), the largest request allowed, and `clients` clients sending lone
    requests back to back for `load_s` seconds."""
    statuses: dict[str, list[int]] = {"huge": [], "largest": [], "load": []}
    stop = time.monotonic() + load_s

    def huge() -> None:
        body = {"requests": [LONE] * 2000}
        statuses["huge"].append(httpx.post(url + "/generate", json=body, timeout=600).status_code)

    def largest() -> None:
        body = {"requests": [LONE | {"num_images": 2}] * 16}
        statuses["largest"].append(
            httpx.post(url + "/generate", json=body, timeout=600).status_code
        )

    def load() -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            while time.monotonic() < stop:
                response = client.post("/generate", json={"requests": [LONE]})
                statuses["load"].append(response.status_code)

    threads = [threading.Thread(target=huge), threading.Thread(target=largest)]
    threads += [threading.Thread(target=load) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def test_after_any_burst_a_lone_request_is_back_to_its_fresh_latency_within_10_s(server):
    url = server["url"]
    lone_latency(url, 3)  # warm
    fresh, fresh_times = lone_latency(url)
    started = time.monotonic()
    statuses = burst(url)
    ended = time.monotonic()
    # Measured again and again from the burst's end; the guarantee: one measurement begun
    # within 10 s of it is within 1.5× the fresh one (the machine is shared: noise is allowed
    # a second try, a learned wait is not, since it lasts).
    tries = []
    while True:
        begun = time.monotonic() - ended
        after, times = lone_latency(url)
        tries.append((round(begun, 1), round(after, 3), round(after / fresh, 2)))
        if after <= 1.5 * fresh or time.monotonic() - ended > 10:
            break
    print(
        f"\nburst of {ended - started:.1f} s: huge {statuses['huge']}, largest "
        f"{statuses['largest']}, load {len(statuses['load'])} requests "
        f"({sorted(set(statuses['load']))}); fresh lone median {fresh:.3f} s "
        f"({[round(t, 3) for t in fresh_times]}); after (s from the end, median, ratio): {tries}"
    )
    assert statuses["huge"] == [400] and statuses["largest"] == [200]
    assert set(statuses["load"]) == {200}
    begun, after, ratio = tries[-1]
    assert begun <= 10 and ratio <= 1.5, tries


# --- disconnects


def send_raw(url: str, path: str, body: bytes, send_bytes: int | None = None) -> socket.socket:
    """A POST whose first `send_bytes` bytes of body (all by default) are sent; the socket."""
    where = urlsplit(url)
    sock = socket.create_connection((where.hostname, where.port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {where.hostname}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body[: len(body) if send_bytes is None else send_bytes])
    return sock


ABANDONED = 20
HANGING = "failpoint pipeline: hanging"
HEAVY = {"prompt": "abandoned", "seed": 3, "width": 128, "height": 128, "steps": 20}


def hold_and_abandon(
    url: str, faults: Path, log_path: Path, outcome: dict
) -> tuple[threading.Thread, bool]:
    """One request held in the pipeline; ABANDONED more sent whole, then their clients leave.
    (the held request's thread, whether the queue was back to the held request within 10 s)."""
    hangs = log_path.read_text().count(HANGING)
    faults.write_text("pipeline=hang")
    held = threading.Thread(
        target=lambda: outcome.setdefault(
            "held", httpx.post(url + "/generate", json={"requests": [LONE]}, timeout=120)
        )
    )
    held.start()
    # Held in the pipeline (not merely queued: the abandoned requests must not join its batch).
    assert wait_for(lambda: log_path.read_text().count(HANGING) > hangs)
    body = json.dumps({"requests": [HEAVY]}).encode()
    sockets = [send_raw(url, "/generate", body) for _ in range(ABANDONED)]
    assert wait_for(lambda: queue_depth(url) == 1 + ABANDONED, 10)
    for sock in sockets:
        sock.close()
    return held, wait_for(lambda: queue_depth(url) == 1, 10)


def test_a_client_that_disconnects_is_logged_as_499_and_its_work_is_dropped_before_it_starts(
    tiny_base, tmp_path
):
    """Clients that leave mid-body, and 20 that send their request and leave while a held batch
    runs: every one is logged 499, none 5xx; the 20 leave the queue at once and none is
    computed. Again with a SIGTERM: the drain waits only for the batch that was running."""
    save_clip(*build_tiny_clip(0), "clip-tiny", source="tiny:seed=0", reuse_identical=True)
    faults = tmp_path / "failpoints"
    faults.write_text("")
    log_path = tmp_path / "server.log"
    env = server_env() | {"BENTOLORA_UI": "0", "BENTOLORA_FAILPOINTS_FILE": str(faults)}
    proc, url = start_server(env, log_path)
    first: dict = {}
    second: dict = {}
    try:
        score = json.dumps({"requests": [{"images": ["A" * 200_000], "texts": ["x"]}]}).encode()
        generate_body = json.dumps({"requests": [LONE]}).encode()
        for path, body in (("/generate", generate_body), ("/score", score)) * 2:
            send_raw(url, path, body, send_bytes=len(body) // 2).close()

        before = images_computed(url)
        held, left = hold_and_abandon(url, faults, log_path, first)
        depth = queue_depth(url)
        faults.write_text("")
        held.join(120)
        assert left, f"the abandoned requests stayed queued: depth {depth:.0f}"
        time.sleep(2)  # anything the server still computed would be counted by now
        computed = images_computed(url) - before
        assert computed == 1, f"{computed:.0f} images computed; only the held request's is due"

        held, left_again = hold_and_abandon(url, faults, log_path, second)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        released = time.monotonic()
        faults.write_text("")
        held.join(120)
        proc.wait(timeout=60)
        drain_s = time.monotonic() - released
    finally:
        faults.write_text("")
        stop_server(proc)
    log = log_path.read_text()
    gone = re.findall(r"path=/(?:generate|score),.*\(status=499,", log)
    print(
        f"\ndisconnects: queue depth {depth:.0f} right after {ABANDONED} clients left; images "
        f"computed {computed:.0f} (the held request's); 499 logged {len(gone)} times; after "
        f"SIGTERM, exited {drain_s:.1f} s after the held batch was released"
    )
    assert left_again
    assert first["held"].status_code == 200 and second["held"].status_code == 200
    assert "status=5" not in log and "Traceback" not in log
    assert len(gone) == 2 * ABANDONED + 4
    assert drain_s < 30

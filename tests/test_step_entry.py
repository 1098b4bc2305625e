"""The step scheduler behind a BentoML batchable /generate (BENTOLORA_STEP_ENTRY=batchable,
issue 17), against a real `bentoml serve` on loopback, the tiny models, a CPU.

The same HTTP contract as the async entry: {"requests": [...]} in, one response per entry out;
concurrent clients' entries share a BentoML batch (the responses' batch_requests say so), each
image equals its request served alone (the request-level path in process, itself checked
against diffusers in test_service.py) within 2/255, and a bad request gets its own 400 naming
the field before any batch."""

from __future__ import annotations

import concurrent.futures
import re
import time

import httpx
import numpy as np
import pytest
from service_helpers import pixels, server_env, start_server, stop_server

from service.settings import Settings

ADAPTERS = ("entry-a", "entry-b")
"""Stored by this module only, and deleted after it."""


def entry(i: int, **fields) -> dict:
    chosen = ADAPTERS[i % 3] if i % 3 < 2 else None
    return {
        "prompt": f"a green triangle {i}",
        "width": 64,
        "height": 64,
        "steps": 6,
        "seed": 700 + i,
        "adapters": [{"name": chosen, "scale": 0.9}] if chosen else [],
        **fields,
    }


def test_step_entry_setting_is_checked():
    assert Settings().step_entry == "async"  # the measured better entry is the default
    assert Settings.from_env({"BENTOLORA_STEP_ENTRY": "batchable"}).step_entry == "batchable"
    with pytest.raises(
        ValueError, match="BENTOLORA_STEP_ENTRY='batched' is not one of async, batchable"
    ):
        Settings.from_env({"BENTOLORA_STEP_ENTRY": "batched"})


@pytest.fixture(scope="module")
def adapters(tiny_base):
    import bentoml
    from diffusers import StableDiffusionXLPipeline
    from store_helpers import attention_adapter

    from models.clip import build_tiny_clip, save_clip

    save_clip(*build_tiny_clip(0), "clip-tiny", source="tiny:seed=0", reuse_identical=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_base.path)
    saved = [attention_adapter(name, tiny_base, pipe, 41 + k) for k, name in enumerate(ADAPTERS)]
    del pipe
    yield saved
    for adapter in saved:
        bentoml.models.delete(adapter.tag)


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    log = tmp_path_factory.mktemp("step-entry") / "server.log"
    env = server_env() | {
        "BENTOLORA_UI": "0",
        "BENTOLORA_SCHEDULING": "step",
        "BENTOLORA_STEP_ENTRY": "batchable",
        "BENTOLORA_MAX_BATCH_IMAGES": "4",
    }
    proc, url = start_server(env, log)
    yield {"url": url, "log": log}
    stop_server(proc)


@pytest.fixture(scope="module")
def alone(adapters):
    """Each entry's image served alone by the request-level path, in process."""
    from service.engine import Engine
    from service.schemas import GenerateRequest

    engine = Engine(Settings(base="sdxl-tiny", clip="clip-tiny", device="cpu", ui=False))
    return [
        pixels(engine.generate([GenerateRequest(**entry(i))])[0].images[0].image) for i in range(6)
    ]


def post(url: str, *entries: dict, timeout: float = 300) -> httpx.Response:
    return httpx.post(url + "/generate", json={"requests": list(entries)}, timeout=timeout)


@pytest.mark.slow
def test_concurrent_clients_share_a_batch_and_get_their_own_images(server, alone):
    url = server["url"]
    warm = post(url, entry(0), entry(1))  # the adapters' first loads
    assert warm.status_code == 200, warm.text[:500]
    # Six clients at once: the first batch takes who has arrived; the rest queue in BentoML's
    # dispatcher while it runs (one batch at a time) and form the next.
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = []
        for i in range(6):
            futures.append(pool.submit(post, url, entry(i)))
            time.sleep(0.02)
        responses = [f.result() for f in futures]
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text[:500]
        [answer] = response.json()  # the contract: one response per entry, as the async entry
        [image] = answer["images"]
        assert np.abs(pixels(image["image"]) - alone[i]).max() <= 2, i
        assert [a["name"] for a in image["adapters"]] == [a["name"] for a in entry(i)["adapters"]]
    timings = [r.json()[0]["images"][0]["timings"] for r in responses]
    # Entries of several clients in one BentoML batch (one submission to the scheduler)...
    assert max(t["batch_requests"] for t in timings) > 1, timings
    # ...denoised together, with different adapter sets in flight.
    assert max(t["batch_images"] for t in timings) > 1, timings


@pytest.mark.slow
def test_two_entries_of_one_request_come_back_in_order(server, alone):
    response = post(server["url"], entry(3), entry(4), entry(5))
    assert response.status_code == 200, response.text[:500]
    answers = response.json()
    assert len(answers) == 3
    for k, answer in enumerate(answers):
        assert np.abs(pixels(answer["images"][0]["image"]) - alone[3 + k]).max() <= 2, k


@pytest.mark.slow
def test_a_bad_request_gets_a_400_naming_the_field(server):
    bad = post(server["url"], entry(0, steps=0), timeout=60)
    assert bad.status_code == 400, bad.text[:500]
    assert "steps" in bad.text
    unknown = post(server["url"], entry(0, adapters=[{"name": "no-such-entry", "scale": 1}]))
    assert unknown.status_code == 400, unknown.text[:500]
    assert "no-such-entry" in unknown.text


@pytest.mark.slow
def test_a_client_that_leaves_has_its_images_retired(server):
    """The client-gone event reaches the items through validation (batcher.mark_client): the
    scheduler retires the leaving client's image at a step boundary (150 steps of 256² with
    guidance take far longer) and the batch answers without it."""
    with pytest.raises(httpx.TimeoutException):
        post(server["url"], entry(2, steps=150, guidance=7.5, width=256, height=256), timeout=1.5)
    answered = re.compile(r"path=/generate,.*\(status=200,[^)]*length=(\d+)\) ([\d.]+)ms")
    deadline = time.monotonic() + 60
    while True:
        done = [
            m for line in server["log"].read_text().splitlines() if (m := answered.search(line))
        ]
        # The leaving request's answer, which nobody reads: no image in it, soon after it left
        if done and int(done[-1][1]) < 100:
            assert float(done[-1][2]) < 5000, done[-1][0]
            break
        assert time.monotonic() < deadline, server["log"].read_text()[-3000:]
        time.sleep(0.2)
    assert post(server["url"], entry(1)).status_code == 200  # the next client is served

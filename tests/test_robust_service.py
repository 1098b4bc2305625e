"""The guarded server: tokens, CORS, pickle and body limits, bad adapters in the store, an admin
reload, overload refused with Retry-After, an injected out-of-memory, fuzzing from the OpenAPI
schema. One real `bentoml serve` on loopback with the tiny models, on a CPU."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
import logging
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from bentoml.exceptions import BentoMLException
from PIL import Image
from safetensors.torch import save_file

from models.adapter import WEIGHTS_NAME, weights_path
from models.bases import save_base
from models.clip import build_tiny_clip, save_clip
from models.store import create_entry
from models.tiny import build_tiny_pipeline
from service.client import AsyncClient, Client
from tests.service_helpers import pixels, server_env, start_server, stop_server
from tests.store_helpers import LAYER, one_layer, one_layer_adapter, tiny_info

pytestmark = pytest.mark.slow

TOKEN = "client-secret"
ADMIN = "admin-secret"
ORIGIN = "https://ui.example.com"
MAX_QUEUE = 4
SMALL = {"width": 64, "height": 64, "steps": 4, "guidance": 5.0}
USER = {"Authorization": f"Bearer {TOKEN}"}


def raw_adapter(name: str, base, files: dict[str, bytes | dict]) -> None:
    """A store entry written by hand (as a careless tool or a bad actor could): adapter labels,
    metadata naming `base`, and exactly `files` (bytes, or tensors saved as safetensors)."""
    from models.adapter import KIND
    from models.store import BASE_LABEL

    with create_entry(
        f"lora-{name}", kind=KIND, labels={BASE_LABEL: base.name}, metadata={}
    ) as staged:
        for filename, content in files.items():
            if isinstance(content, dict):
                save_file(content, staged.path / filename)
            else:
                (staged.path / filename).write_bytes(content)
        staged.metadata.update(tiny_info(base).to_metadata())


class Exploit:
    """Unpickling this creates a file: proof that a pickle body was (or was not) deserialized."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def bad_adapters(tiny_base):
    """One good adapter and one of each kind of bad one, all in the store before the server starts."""
    one_layer_adapter("good", tiny_base, value=0.05)
    for name in ("corrupt", "truncated"):
        entry = one_layer_adapter(name, tiny_base)
        path = weights_path(entry)
        data = bytearray(path.read_bytes())
        if name == "corrupt":
            data[-16:] = bytes(16)  # same size, different bytes: only the hash can tell
        else:
            data = data[: len(data) // 2]
        path.write_bytes(bytes(data))
    raw_adapter("garbage", tiny_base, {WEIGHTS_NAME: b"\x00\x01 not safetensors at all"})
    wrong = one_layer(tiny_base)["unet"]
    wrong[f"{LAYER}.lora_A.weight"] = torch.zeros(2, 48)  # the layer is 64 wide
    raw_adapter(
        "wrong-shape", tiny_base, {WEIGHTS_NAME: {f"unet.{k}": v for k, v in wrong.items()}}
    )
    nan = {f"unet.{k}": v for k, v in one_layer(tiny_base)["unet"].items()}
    nan[f"unet.{LAYER}.lora_B.weight"][0, 0] = float("nan")
    raw_adapter("non-finite", tiny_base, {WEIGHTS_NAME: nan})
    buffer = io.BytesIO()
    torch.save(one_layer(tiny_base)["unet"], buffer)
    raw_adapter("pickled", tiny_base, {"pytorch_lora_weights.bin": buffer.getvalue()})
    other = save_base(build_tiny_pipeline(seed=5), "sdxl-tiny-other", source="tiny:seed=5")
    one_layer_adapter("other-base", other)
    return {
        "corrupt": "content hash mismatch",
        "truncated": "content hash mismatch",
        "garbage": "not a readable safetensors file",
        "wrong-shape": "does not fit a layer of 64->64",
        "non-finite": "is not finite",
        "pickled": "pickled weights (pytorch_lora_weights.bin)",
    }


@pytest.fixture(scope="module")
def guarded(tiny_base, bad_adapters, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guarded")
    save_clip(*build_tiny_clip(0), "clip-tiny", source="tiny:seed=0")
    admin_file = tmp / "admin-token"
    admin_file.write_text(ADMIN + "\n")
    faults = tmp / "failpoints"
    faults.write_text("")
    env = server_env() | {
        "BENTOLORA_TOKEN": TOKEN,
        "BENTOLORA_ADMIN_TOKEN_FILE": str(admin_file),
        "BENTOLORA_CORS_ORIGINS": ORIGIN,
        "BENTOLORA_MAX_QUEUE": str(MAX_QUEUE),
        "BENTOLORA_MAX_BODY_BYTES": str(2 * 2**20),
        "BENTOLORA_MAX_PIXELS": str(64 * 64),
        "BENTOLORA_FAILPOINTS_FILE": str(faults),
        # The admin reload test saves an adapter and expects it unserved until the reload: no
        # store watcher (tests/test_live_adapters.py tests it).
        "BENTOLORA_ADAPTER_WATCH_S": "0",
    }
    proc, url = start_server(env, tmp / "server.log")
    yield {"url": url, "faults": faults, "log": tmp / "server.log"}
    stop_server(proc)


@pytest.fixture(scope="module")
def http(guarded):
    with httpx.Client(base_url=guarded["url"], timeout=120) as client:
        yield client


def generate(http, headers=USER, **fields):
    body = {"requests": [{"prompt": "a red square", "seed": 7, **SMALL, **fields}]}
    return http.post("/generate", json=body, headers=headers)


def png_b64(size=(32, 32)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# --- authentication and CORS


@pytest.mark.parametrize(
    "headers, status",
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": f"Basic {TOKEN}"}, 401),
        (USER, 200),
        ({"Authorization": f"Bearer {ADMIN}"}, 200),
    ],
)
def test_generate_needs_the_token(http, headers, status):
    response = generate(http, headers=headers)
    assert response.status_code == status, response.text
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert "bearer token" in response.json()["error"]


@pytest.mark.parametrize("path", ["/adapters/", "/docs.json", "/"])
def test_every_other_route_needs_the_token_too(http, path):
    assert http.get(path).status_code == 401
    assert http.get(path, headers=USER).status_code == 200


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/healthz", "/metrics"])
def test_health_and_metrics_stay_open(http, path):
    assert http.get(path).status_code == 200


def test_cors_only_for_the_configured_origin(http):
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    allowed = http.options("/generate", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    other = http.options("/generate", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    simple = generate(http, headers={**USER, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in simple.headers


# --- the Python clients and the command line, with the token


def test_the_client_takes_the_token_and_says_when_it_is_missing(guarded):
    for token, why in ((None, "missing bearer token"), ("wrong", "wrong bearer token")):
        with pytest.raises(BentoMLException) as refused:
            Client(guarded["url"], token=token, timeout=60)
        assert refused.value.error_code == 401 and why in str(refused.value)
    with Client(guarded["url"], token=TOKEN, timeout=120) as client:
        assert client.is_ready()
        assert "good" in {row["name"] for row in client.adapters()}
        [image] = client.generate(
            "a red square",
            negative_prompt="blue",
            seed=7,
            scheduler="ddim",
            adapters={"good": 0.5},
            output_format="webp",
            **SMALL,
        )
        assert image.seed == 7 and image.format == "webp" and image.image.format == "WEBP"
        assert image.settings["scheduler"] == "ddim"
        assert [(a["name"], a["scale"]) for a in image.adapters] == [("good", 0.5)]
        scores = client.score([image.image], ["a red square"])
        assert len(scores.clip_scores) == 1 and scores.image_similarity[0][0] > 0.999
        with pytest.raises(BentoMLException) as bad:
            client.generate("a red square", width=60, height=64, steps=2)
        assert bad.value.error_code == 400 and "multiple of 8" in str(bad.value)


def test_the_async_client_with_the_token_matches_the_blocking_one(guarded):
    async def run():
        async with AsyncClient(guarded["url"], token=TOKEN, timeout=120) as client:
            ready = await client.is_ready()
            adapters = await client.adapters()
            batches = await asyncio.gather(
                *(client.generate("a red square", seed=7 + i, **SMALL) for i in range(3))
            )
            scores = await client.score([batches[0][0].image], ["a red square"])
        return ready, adapters, batches, scores

    ready, adapters, batches, scores = asyncio.run(run())
    assert ready and "good" in {row["name"] for row in adapters}
    assert [images[0].seed for images in batches] == [7, 8, 9]
    assert scores.image_similarity[0][0] > 0.999
    with Client(guarded["url"], token=TOKEN, timeout=120) as client:
        [blocking] = client.generate("a red square", seed=7, **SMALL)
    assert abs(pixels(batches[0][0].image) - pixels(blocking.image)).max() <= 2

    async def without_token():
        async with AsyncClient(guarded["url"], timeout=60):
            pass

    with pytest.raises(BentoMLException) as refused:
        asyncio.run(without_token())
    assert refused.value.error_code == 401


def cli(guarded, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BENTOLORA_TOKEN"}
    if token is not None:
        env["BENTOLORA_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "--url", guarded["url"], "--timeout", "120", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )


def test_the_command_line_takes_the_token_from_the_option_or_the_environment(guarded, tmp_path):
    assert "good" in {
        row["name"] for row in json.loads(cli(guarded, "adapters", token=TOKEN).stdout)
    }
    listed = cli(guarded, "--token", TOKEN, "adapters")
    assert listed.returncode == 0 and "good" in listed.stdout, listed.stderr
    out = tmp_path / "square.png"
    made = cli(
        guarded,
        "--token",
        TOKEN,
        "generate",
        "a red square",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--seed",
        "3",
        "-o",
        str(out),
        token="wrong",
    )
    assert made.returncode == 0 and "seed 3" in made.stdout, made.stderr  # --token wins
    assert Image.open(out).size == (64, 64)
    for token, why in ((None, "missing bearer token"), ("wrong", "wrong bearer token")):
        refused = cli(guarded, "adapters", token=token)
        assert (
            refused.returncode == 1 and why in refused.stderr and "Traceback" not in refused.stderr
        )


# --- hostile bodies


@pytest.mark.parametrize("path", ["/generate", "/score", "/adapters/", "/adapters/reload", "/"])
def test_pickle_bodies_are_refused_and_never_unpickled(http, path, tmp_path):
    marker = tmp_path / "unpickled"
    for media_type in ("application/vnd.bentoml+pickle", "application/python-pickle"):
        response = http.post(
            path,
            content=pickle.dumps(Exploit(marker)),
            headers={**USER, "Content-Type": media_type},
        )
        assert response.status_code == 415, response.text
    assert not marker.exists()


def test_oversized_bodies_are_refused_with_413(http):
    big = {"requests": [{"images": [base64.b64encode(bytes(3 * 2**20)).decode()]}]}
    response = http.post("/score", json=big, headers=USER)
    assert response.status_code == 413
    assert "over 2097152 bytes" in response.json()["error"]

    def chunks():  # no Content-Length: counted as it streams
        yield b'{"requests": [{"images": ["'
        for _ in range(40):
            yield b"A" * 100_000
        yield b'"]}]}'

    streamed = http.post(
        "/score", content=chunks(), headers={**USER, "Content-Type": "application/json"}
    )
    assert streamed.status_code == 413


def test_adapter_names_with_paths_are_refused(http):
    for name in ("../../etc/passwd", "/abs/path", "good/../good"):
        response = generate(http, adapters=[{"name": name}])
        assert response.status_code == 400 and "unknown adapter" in response.text


# --- adapters: every bad one refused before it reaches the pipeline, the good one served


def test_bad_adapters_are_listed_as_refused_with_the_reason(http, bad_adapters):
    listing = http.get("/adapters/", headers=USER).json()
    served = {row["name"] for row in listing["adapters"]}
    assert "good" in served
    for name, reason in bad_adapters.items():
        assert name not in served
        assert reason in listing["refused"][name], (name, listing["refused"].get(name))


def test_requests_naming_a_bad_adapter_get_400_with_the_reason(http, bad_adapters):
    for name, reason in bad_adapters.items():
        response = generate(http, adapters=[{"name": name}])
        assert response.status_code == 400, (name, response.text)
        assert "refused by this server" in response.text and reason in response.text
    foreign = generate(http, adapters=[{"name": "other-base"}])
    assert foreign.status_code == 400 and "made for base sdxl-tiny-other" in foreign.text
    good = generate(http, adapters=[{"name": "good"}])
    assert good.status_code == 200, good.text


def test_admin_reload_needs_the_admin_token_and_picks_up_new_adapters(http, tiny_base):
    # A name no other test module saves (the session's store is shared, and a server serves
    # what the store holds when it starts).
    one_layer_adapter("late-robust", tiny_base, value=0.03)
    assert generate(http, adapters=[{"name": "late-robust"}]).status_code == 400
    assert http.post("/adapters/reload").status_code == 401
    assert http.post("/adapters/reload", headers=USER).status_code == 403
    response = http.post("/adapters/reload", headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 200
    assert "late-robust" in {row["name"] for row in response.json()["adapters"]}
    assert generate(http, adapters=[{"name": "late-robust"}]).status_code == 200


# --- faults: out of memory in the pipeline call


def test_out_of_memory_splits_the_batch_and_the_images_stay_the_same(http, guarded):
    clean = generate(http, num_images=4).json()[0]["images"]
    assert {image["timings"]["batch_images"] for image in clean} == {4}
    guarded["faults"].write_text("pipeline=oom_over:1")
    try:
        split = generate(http, num_images=4)
    finally:
        guarded["faults"].write_text("")
    assert split.status_code == 200, split.text
    images = split.json()[0]["images"]
    assert {image["timings"]["batch_images"] for image in images} == {1}
    for got, want in zip(images, clean, strict=True):
        assert got["seed"] == want["seed"]
        assert abs(pixels(got["image"]) - pixels(want["image"])).max() <= 2
    assert "bentolora_oom_total" in http.get("/metrics").text


def test_out_of_memory_on_one_image_is_503_and_the_next_request_succeeds(http, guarded):
    guarded["faults"].write_text("pipeline=oom")
    try:
        response = generate(http)
    finally:
        guarded["faults"].write_text("")
    assert response.status_code == 503
    assert "out of GPU memory" in response.text
    assert http.get("/livez").status_code == 200
    assert generate(http).status_code == 200


# --- a score beside an image batch


def test_a_score_is_answered_while_an_image_batch_runs(http, guarded):
    """/score does not wait behind /generate: with an image batch held in the pipeline
    (failpoint `hang`, which logs when reached), a score is answered; the batch finishes once
    released."""
    log = guarded["log"]
    hangs = log.read_text().count("failpoint pipeline: hanging")
    score = {"requests": [{"images": [png_b64()], "texts": ["a green square"]}]}
    guarded["faults"].write_text("pipeline=hang")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            generating = pool.submit(generate, http, prompt="held in the pipeline")
            deadline = time.monotonic() + 120
            while log.read_text().count("failpoint pipeline: hanging") == hangs:
                assert time.monotonic() < deadline and not generating.done()
                time.sleep(0.05)
            scoring = pool.submit(http.post, "/score", json=score, headers=USER)
            done, _ = concurrent.futures.wait(
                [scoring, generating], timeout=100, return_when=concurrent.futures.FIRST_COMPLETED
            )
            assert done == {scoring}, "the score waited for the image batch"
        finally:
            guarded["faults"].write_text("")  # releases the batch
        assert scoring.result().status_code == 200, scoring.result().text
        assert generating.result().status_code == 200


# --- overload


def queue_depth(http) -> float:
    found = re.search(
        r'bentolora_queue_depth\{endpoint="/generate"[^}]*\} (\S+)', http.get("/metrics").text
    )
    return float(found.group(1)) if found else 0.0


SLOW = {"requests": [{"prompt": "slow", "seed": 1, **SMALL, "steps": 40, "num_images": 2}]}


def fill_the_queue(pool, guarded, http) -> list[concurrent.futures.Future]:
    """MAX_QUEUE slow requests in flight, so the next one is refused; their futures."""
    accepted = [
        pool.submit(httpx.post, guarded["url"] + "/generate", json=SLOW, headers=USER, timeout=120)
        for _ in range(MAX_QUEUE)
    ]
    deadline = time.monotonic() + 30
    while queue_depth(http) < MAX_QUEUE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert queue_depth(http) == MAX_QUEUE
    return accepted


def test_overload_is_refused_at_once_with_retry_after_and_accepted_requests_finish(http, guarded):
    """The queue full with slow requests, then 3× as many more (4× capacity in all): the excess
    is answered 429 in < 100 ms while the CPU is busy denoising, and the accepted ones finish."""
    slow = SLOW
    with concurrent.futures.ThreadPoolExecutor(MAX_QUEUE) as pool:
        accepted = fill_the_queue(pool, guarded, http)
        refusals = []
        for _ in range(3 * MAX_QUEUE):
            started = time.perf_counter()
            response = http.post("/generate", json=slow, headers=USER)
            refusals.append((response, time.perf_counter() - started))
        results = [f.result() for f in accepted]
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    times = sorted(t for _, t in refusals)
    print(
        f"\noverload: {len(refusals)} refused while {MAX_QUEUE} ran; refusal median "
        f"{times[len(times) // 2] * 1000:.1f} ms, slowest {times[-1] * 1000:.1f} ms"
    )
    for response, _ in refusals:
        assert response.status_code == 429, response.text
        assert int(response.headers["Retry-After"]) >= 1
        assert f"queued (limit {MAX_QUEUE})" in response.json()["error"]
    assert times[-1] < 0.1
    assert 'bentolora_refused_total{endpoint="/generate"}' in http.get("/metrics").text


def test_the_client_waits_out_429_as_retry_after_says(http, guarded, caplog):
    """With the queue full, a client that may not retry gets the 429; one that may waits as the
    server's Retry-After says and gets its image once the queue has room."""
    with Client(guarded["url"], token=TOKEN, timeout=120, retries=0) as impatient:
        with Client(guarded["url"], token=TOKEN, timeout=120, retries=30) as patient:
            with concurrent.futures.ThreadPoolExecutor(MAX_QUEUE) as pool:
                accepted = fill_the_queue(pool, guarded, http)
                with pytest.raises(BentoMLException) as refused:
                    impatient.generate("a red square", seed=7, **SMALL)
                with caplog.at_level(logging.INFO, logger="service.client"):
                    [image] = patient.generate("a red square", seed=7, **SMALL)
                results = [f.result() for f in accepted]
    assert refused.value.error_code == 429 and "queued (limit" in str(refused.value)
    assert image.seed == 7 and all(r.status_code == 200 for r in results)
    waits = [r.getMessage() for r in caplog.records if "answered 429" in r.getMessage()]
    assert waits, "the queue was full, yet the patient client was never refused"


# --- fuzzing from the OpenAPI schema


def test_fuzzing_the_api_from_its_schema_finds_no_server_error(guarded, tmp_path):
    schema = tmp_path / "openapi.json"
    spec = httpx.get(guarded["url"] + "/docs.json", headers=USER).json()
    schema.write_text(json.dumps(spec))
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            str(schema),
            "--url",
            guarded["url"],
            "--checks",
            "not_a_server_error",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--max-examples",
            "25",
            "--phases",
            "examples,coverage,fuzzing",
            "--workers",
            "1",
            "--seed",
            "1",
            "--suppress-health-check",
            "all",
            "--request-timeout",
            "120",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]

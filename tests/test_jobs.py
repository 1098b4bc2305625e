"""Long jobs (service.jobs) on an engine (tiny base, CPU): a job's result equals the same requests
computed synchronously; progress counts images and steps; a cancel stops the GPU work within one
denoising step (measured: steps done when the cancel came vs when the job stopped); a deadline
stops it the same way; an oversized job is refused 400. Over HTTP: tests/test_jobs_http.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from http import HTTPStatus

import numpy as np
import pytest
from bentoml.exceptions import BentoMLException

from service.jobs import Job, JobBoard, JobStopped
from service.schemas import GenerateRequest
from tests.service_helpers import pixels
from tests.test_image_modes import TOLERANCE, edit_style, engine  # noqa: F401 (fixtures)

SMALL = {"width": 64, "height": 64, "guidance": 5.0}


def images(responses) -> list[np.ndarray]:
    return [pixels(image.image) for response in responses for image in response.images]


def run_job(board: JobBoard, engine, task_id: str, requests, deadline_s=None):  # noqa: F811
    return asyncio.run(board.run(engine.image_modes, task_id, requests, deadline_s))


def test_a_job_equals_the_same_requests_done_synchronously(engine):  # noqa: F811
    requests = [
        GenerateRequest(prompt="a red circle", seed=3, steps=4, num_images=2, **SMALL),
        GenerateRequest(prompt="a blue square", seed=8, steps=4, **SMALL),
        GenerateRequest(
            prompt="stripes", seed=1, steps=3, adapters=[{"name": "edit-style"}], **SMALL
        ),
    ]
    board = JobBoard()
    got = images(run_job(board, engine, "t1", requests))
    want = images(engine.generate(requests))
    assert len(got) == len(want) == 4
    for g, w in zip(got, want, strict=True):
        assert np.abs(g - w).max() <= TOLERANCE
    progress = board.get("t1").progress()
    assert progress["state"] == "done"
    assert progress["images_done"] == progress["images_total"] == 4
    # three calls (the groups: steps 4 without adapter, steps 3 with it): 4 + 3 steps
    assert progress["steps_done"] == 7
    assert progress["preview"] is None  # no call reached PREVIEW_EVERY steps


def test_a_running_job_shows_a_preview_from_its_latents(engine):  # noqa: F811
    import base64
    import io

    from PIL import Image

    board = JobBoard()
    run_job(board, engine, "t6", [GenerateRequest(prompt="x", seed=1, steps=6, **SMALL)])
    preview = Image.open(io.BytesIO(base64.b64decode(board.get("t6").progress()["preview"])))
    assert preview.format == "PNG" and preview.size == (8, 8)  # 64 px / the VAE's 8


def wait_for(condition, timeout_s: float = 120) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def long_job() -> list[GenerateRequest]:
    return [
        GenerateRequest(prompt=f"p{i}", seed=i, steps=40, num_images=2, **SMALL) for i in range(3)
    ]


def test_a_cancel_stops_the_job_within_one_denoising_step(engine):  # noqa: F811
    board = JobBoard()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_job, board, engine, "t2", long_job())
        wait_for(lambda: board.get("t2") is not None and board.get("t2").steps_done >= 5)
        job: Job = board.cancel("t2")
        at_cancel = job.steps_at_cancel
        with pytest.raises(JobStopped) as err:
            future.result(timeout=120)
    assert err.value.error_code == HTTPStatus.CONFLICT and "cancelled" in str(err.value)
    progress = job.progress()
    assert progress["state"] == "cancelled"
    assert progress["steps_done"] - at_cancel <= 1, progress
    assert progress["images_done"] < progress["images_total"]
    assert engine._lock.acquire(timeout=1)  # the pipeline is free again
    engine._lock.release()


def test_a_job_past_its_deadline_stops_at_the_next_step(engine):  # noqa: F811
    board = JobBoard()
    started = time.monotonic()
    with pytest.raises(JobStopped) as err:
        run_job(board, engine, "t3", long_job(), deadline_s=0.5)
    assert err.value.error_code == HTTPStatus.GATEWAY_TIMEOUT
    assert board.get("t3").state == "expired"
    assert board.get("t3").images_done == 0 and time.monotonic() - started < 30


def test_a_job_cancelled_before_it_starts_runs_nothing(engine):  # noqa: F811
    board = JobBoard()
    job = Job("t4", images_total=1)
    board._add(job)
    board.cancel("t4")
    with pytest.raises(JobStopped):
        JobBoard._work(engine.image_modes, job, long_job())
    assert job.steps_done == 0


def test_an_oversized_job_is_refused_400(engine):  # noqa: F811
    board = JobBoard(max_items=2, max_images=3)
    requests = [GenerateRequest(prompt="x", steps=1, num_images=2, **SMALL)] * 2
    with pytest.raises(BentoMLException) as err:
        run_job(board, engine, "t5", requests)
    assert err.value.error_code == HTTPStatus.BAD_REQUEST and "at most 3 images" in str(err.value)
    assert board.get("t5") is None


def test_submits_past_the_job_bound_are_refused_429_and_bentomls_cancel_stops_the_work():
    from starlette.testclient import TestClient

    from service.jobs import JobGate

    seen = []

    async def app(scope, receive, send):
        seen.append((scope["method"], scope["path"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    board = JobBoard()
    http = TestClient(JobGate(app, board=board, max_jobs=1))
    assert http.post("/job/submit", json={"requests": []}).status_code == 200
    board._add(Job("running", images_total=1, state="running"))
    refused = http.post("/job/submit", json={"requests": []})
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "10"
    assert http.put("/job/cancel?task_id=running").status_code == 200  # BentoML answers
    assert board.get("running").cancelled.is_set()
    assert http.post("/job", json={}).status_code == 404
    assert seen == [("POST", "/job/submit"), ("PUT", "/job/cancel")]

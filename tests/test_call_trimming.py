"""An image nobody will read leaves a running pipeline call at the next denoising step
(service.call_trimming): its client disconnected, or its request's deadline passed. The peer of
every image still wanted is the same request served alone."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from test_mixed_adapters import adapters  # noqa: F401 - the module's adapter fixture

from service.engine import Engine
from service.schemas import GenerateRequest, Img2ImgRequest
from service.settings import Settings
from tests.service_helpers import response_pixels

STEPS = 6
LEAVE_AFTER = 2  # UNet calls before the image becomes unwanted


def engine(**options) -> Engine:
    return Engine(
        Settings(
            base="sdxl-tiny",
            clip="clip-tiny",
            device="cpu",
            ui=False,
            max_batch_images=8,
            **options,
        )
    )


def request(i: int, scheduler: str, chosen: list[tuple[str, float]], **fields) -> GenerateRequest:
    return GenerateRequest(
        prompt=f"a green square {i}",
        width=64,
        height=64,
        steps=STEPS,
        scheduler=scheduler,
        seed=700 + i,
        adapters=[{"name": n, "scale": s} for n, s in chosen],
        **fields,
    )


def unet_batches(served: Engine, after: int, leave) -> list[int]:
    """The UNet's batch size at each call; `leave()` runs once `after` calls have been made."""
    sizes: list[int] = []

    def hook(module, args, kwargs):
        sizes.append(args[0].shape[0])
        if len(sizes) == after:
            leave()

    served.pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    return sizes


SETS = [[("mix-a", 0.8)], [("mix-b", -0.6)], []]


def make_unwanted(leaving: GenerateRequest, how: str):
    if how == "disconnect":
        leaving._gone = threading.Event()
        return leaving._gone.set

    def pass_deadline():
        leaving._received -= 100  # its own deadline_s (30 s) is now 70 s behind

    return pass_deadline


@pytest.mark.parametrize(
    "scheduler, how",
    [
        ("euler_a", "disconnect"),  # noise drawn from each image's generator at every step
        ("dpmpp_2m_karras", "deadline"),  # per-image history across steps
        ("unipc", "disconnect"),  # history and the last sample
    ],
)
def test_an_unwanted_image_leaves_the_call_and_the_rest_are_unchanged(adapters, scheduler, how):  # noqa: F811
    alone = engine()
    want = [
        response_pixels(alone.generate([request(i, scheduler, s)])[0]) for i, s in enumerate(SETS)
    ]

    served = engine()
    requests = [request(i, scheduler, s) for i, s in enumerate(SETS)]
    requests[1] = request(1, scheduler, SETS[1], deadline_s=30)
    sizes = unet_batches(served, LEAVE_AFTER, make_unwanted(requests[1], how))
    responses = served.generate(requests)

    # Three images under guidance (6 rows) for two steps; then two images (4 rows).
    assert sizes == [6] * LEAVE_AFTER + [4] * (STEPS - LEAVE_AFTER)
    assert responses[1].images == []
    for i in (0, 2):
        [got] = response_pixels(responses[i])
        assert np.abs(got - want[i][0]).max() <= 2, (scheduler, i)
        assert responses[i].images[0].timings["batch_adapter_sets"] == 3


def test_a_call_whose_images_all_leave_stops_at_the_next_step(adapters):  # noqa: F811
    served = engine()
    requests = [request(i, "euler", []) for i in range(2)]
    for r in requests:
        r._gone = threading.Event()
    sizes = unet_batches(served, LEAVE_AFTER, lambda: [r._gone.set() for r in requests])
    responses = served.generate(requests)
    assert len(sizes) == LEAVE_AFTER  # no step after the one during which they left
    assert all(r.images == [] for r in responses)


def test_img2img_images_leave_the_call_too(adapters):  # noqa: F811
    from PIL import Image

    from service.images import encode

    init = encode(Image.new("RGB", (64, 64), (200, 30, 30)), "png")

    def img2img(i: int) -> Img2ImgRequest:
        return Img2ImgRequest(
            prompt=f"a cat {i}", image=init, strength=1.0, steps=STEPS, seed=40 + i
        )

    alone = engine()
    want = response_pixels(alone.img2img([img2img(0)])[0])
    served = engine()
    requests = [img2img(0), img2img(1)]
    sizes = unet_batches(served, LEAVE_AFTER, make_unwanted(requests[1], "disconnect"))
    responses = served.img2img(requests)
    assert sizes == [4] * LEAVE_AFTER + [2] * (STEPS - LEAVE_AFTER)
    assert responses[1].images == []
    assert np.abs(response_pixels(responses[0])[0] - want[0]).max() <= 2


def test_a_long_job_is_not_bounded_by_the_server_request_timeout(adapters):  # noqa: F811
    """A job's requests run for as long as the job takes (the job has its own deadline); the
    server's request timeout would have dropped them."""
    served = engine(request_timeout_s=1)
    old = request(0, "euler", [])
    old._received -= 50
    [response] = served.image_modes.run("generate", [old], timeout_s=math.inf)
    assert len(response.images) == 1
    [dropped] = served.image_modes.run("generate", [old])  # the server's timeout
    assert dropped.images == []

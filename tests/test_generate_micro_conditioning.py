"""SDXL micro-conditioning on /generate (original_size, crops_coords_top_left, target_size and
the negative sizes): each image equals plain diffusers' for the same fields, in the request-level
path and in the step scheduler, alone and batched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from pydantic import ValidationError

from service.engine import Engine
from service.schemas import GenerateRequest
from service.settings import Settings
from tests.service_helpers import response_pixels

FIELDS = {
    "original_size": (128, 96),
    "crops_coords_top_left": (16, 8),
    "target_size": (64, 64),
}
NEGATIVE = {"negative_original_size": (32, 32), "negative_target_size": (48, 64)}


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_base):
    from models.clip import build_tiny_clip, save_clip

    save_clip(*build_tiny_clip(0), "clip-tiny", source="tiny:seed=0", reuse_identical=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_base.path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def engine(**options) -> Engine:
    return Engine(Settings(base="sdxl-tiny", clip="clip-tiny", device="cpu", ui=False, **options))


def request(seed: int, **fields) -> GenerateRequest:
    return GenerateRequest(
        prompt="a blue triangle", width=64, height=64, steps=4, seed=seed, **fields
    )


def peer(pipe, seed: int, **fields) -> np.ndarray:
    image = pipe(
        prompt="a blue triangle",
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(seed),
        **fields,
    ).images[0]
    return np.asarray(image, dtype=int)


@pytest.mark.parametrize("scheduling", ["request", "step"])
def test_each_image_equals_diffusers_with_the_same_micro_conditioning(diffusers_pipe, scheduling):
    served = engine(scheduling=scheduling, max_batch_images=4)
    mixed = [
        request(10, **FIELDS),
        request(11),  # another group in request mode; the same steps in step mode
        request(12, **FIELDS, **NEGATIVE, num_images=2),
    ]
    responses = served.generate(mixed)
    want = [
        [peer(diffusers_pipe, 10, **FIELDS)],
        [peer(diffusers_pipe, 11)],
        [peer(diffusers_pipe, s, **FIELDS, **NEGATIVE) for s in (12, 13)],
    ]
    for response, images in zip(responses, want, strict=True):
        for got, image in zip(response_pixels(response), images, strict=True):
            assert np.abs(got - image).max() <= 2
    # The conditioning changes the image (it is not dropped on the way to the UNet).
    assert np.abs(response_pixels(responses[0])[0] - want[1][0]).max() > 2
    # Negative sizes: diffusers would misplace the second image's time ids in one call.
    assert list(responses[2].images[0].settings["negative_original_size"]) == [32, 32]
    if scheduling == "request":
        assert [i.timings["batch_images"] for i in responses[2].images] == [1, 1]


def test_requests_with_other_micro_conditioning_do_not_share_a_call(diffusers_pipe):
    served = engine(max_batch_images=4)
    responses = served.generate([request(20, **FIELDS), request(21), request(22, **FIELDS)])
    assert [r.images[0].timings["batch_images"] for r in responses] == [2, 1, 2]


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"negative_original_size": (32, 32)}, "negative_target_size"),
        ({"original_size": (0, 64)}, "original_size"),
        ({"crops_coords_top_left": (-1, 0)}, "crops_coords_top_left"),
        ({"target_size": (64,)}, "target_size"),
    ],
)
def test_bad_micro_conditioning_is_refused_naming_the_field(fields, named):
    with pytest.raises(ValidationError) as err:
        request(0, **fields)
    assert named in str(err.value)

"""Every image mode in bfloat16 (the engine's dtype on a GPU), on a CPU with the tiny models:
img2img (also the VAE round trip of strength 0), inpainting, ControlNet (loaded in float32, moved
to the base's dtype), the refiner handoff and refine-after. Shapes and dtypes only: the
comparisons with diffusers run in float32 (tests/test_image_modes.py and its siblings)."""

from __future__ import annotations

import pytest

from models.cli import main as models_cli
from service.engine import Engine
from service.schemas import (
    ControlNetRequest,
    Img2ImgRequest,
    InpaintRequest,
    RefinedRequest,
    RefineRequest,
)
from service.settings import Settings
from tests.test_image_modes import b64, half_mask, picture

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bf16_engine(tiny_base):
    from models.clip import build_tiny_clip, save_clip

    save_clip(*build_tiny_clip(0), "clip-tiny", source="tiny:seed=0", reuse_identical=True)
    assert models_cli(["build-tiny-controlnet", "--name", "tiny"]) == 0
    assert models_cli(["build-tiny-refiner"]) == 0
    made = Engine(
        Settings(
            base="sdxl-tiny",
            clip="clip-tiny",
            device="cpu",
            dtype="bfloat16",
            ui=False,
            refiner="sdxl-tiny-refiner",
        )
    )
    yield made
    made.encoder.close()


def test_every_mode_runs_in_bfloat16(bf16_engine):
    image, small = b64(picture(1)), {"steps": 4, "seed": 1}
    control = [{"name": "tiny", "image": image}]
    cases = [
        ("img2img", Img2ImgRequest(prompt="x", image=image, **small), 3),
        ("img2img", Img2ImgRequest(prompt="x", image=image, strength=0, **small), 0),
        ("inpaint", InpaintRequest(prompt="x", image=image, mask=b64(half_mask()), **small), 4),
        (
            "controlnet",
            ControlNetRequest(prompt="x", width=64, height=64, controlnets=control, **small),
            4,
        ),
        ("handoff", RefinedRequest(prompt="x", width=64, height=64, **small), 4),
        ("refine", RefineRequest(prompt="x", image=image, strength=0.5, **small), 2),
    ]
    assert str(bf16_engine.pipe.unet.dtype) == "torch.bfloat16"
    for mode, request, steps in cases:
        [response] = getattr(bf16_engine, mode)([request])
        [made] = response.images
        assert made.timings["steps_run"] == steps, mode
        assert made.settings["mode"] == mode and made.seed == 1

"""The SDXL refiner (models.refiners; /generate_with_refiner and /refine through
service.image_modes) on the tiny base and a tiny refiner-architecture model, on a CPU: the
handoff equals diffusers' ensemble of experts (base to `denoising_end`, refiner from
`denoising_start`), alone and batched; refine-after equals diffusers' refiner as image-to-image;
a handoff outside (0, 1), a missing refiner and adapters on the refiner are refused."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch
from bentoml.exceptions import InvalidArgument
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from models.cli import main as models_cli
from models.store import get_entry
from service.engine import Engine
from service.schemas import RefinedRequest, RefineRequest, bind_image_requests
from service.settings import Settings
from service.state import ServedSnapshot, ServerState
from tests.service_helpers import pixels
from tests.test_image_modes import (  # noqa: F401 (fixtures)
    TOLERANCE,
    b64,
    edit_style,
    engine,
    errors,
    picture,
)

SMALL = {"width": 64, "height": 64, "steps": 6, "guidance": 5.0}


@pytest.fixture(scope="module")
def refiner_entry(tiny_base):
    assert models_cli(["build-tiny-refiner", "--base", "sdxl-tiny"]) == 0
    return get_entry("sdxl-tiny-refiner", kind="refiner")


@pytest.fixture(scope="module")
def refined_engine(refiner_entry, edit_style):  # noqa: F811
    made = Engine(
        Settings(
            base="sdxl-tiny", clip="clip-tiny", device="cpu", ui=False, refiner="sdxl-tiny-refiner"
        )
    )
    yield made
    made.encoder.close()


@pytest.fixture(scope="module")
def peers(tiny_base, refiner_entry):
    base = StableDiffusionXLPipeline.from_pretrained(tiny_base.path)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_entry.path)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    return base, refiner


def ensemble(peers, prompt: str, seed: int, handoff: float) -> np.ndarray:
    base, refiner = peers
    generator = [torch.Generator().manual_seed(seed)]
    common = {"num_inference_steps": 6, "guidance_scale": 5.0, "generator": generator}
    latents = base(
        prompt, width=64, height=64, denoising_end=handoff, output_type="latent", **common
    ).images
    return pixels(refiner(prompt, image=latents, denoising_start=handoff, **common).images[0])


def served(engine, mode: str, requests) -> list[np.ndarray]:  # noqa: F811
    return [pixels(i.image) for r in getattr(engine, mode)(requests) for i in r.images]


def test_the_handoff_equals_diffusers_ensemble_of_experts(refined_engine, peers):
    want = ensemble(peers, "a castle", 4, 0.7)
    request = RefinedRequest(prompt="a castle", seed=4, handoff=0.7, **SMALL)
    [alone] = served(refined_engine, "handoff", [request])
    assert np.abs(alone - want).max() <= TOLERANCE
    other = RefinedRequest(prompt="a lake", seed=1, handoff=0.7, num_images=2, **SMALL)
    batch = served(refined_engine, "handoff", [other, request])
    assert len(batch) == 3 and np.abs(batch[2] - want).max() <= TOLERANCE
    # the refiner did part of the work: not the base's image alone
    [plain] = refined_engine.generate([RefinedRequest(prompt="a castle", seed=4, **SMALL)])
    assert np.abs(alone - pixels(plain.images[0].image)).max() > 2 * TOLERANCE


def test_refine_after_equals_diffusers_refiner_as_image_to_image(refined_engine, peers):
    init = picture(12)
    want = peers[1](
        "sharper",
        image=init,
        strength=0.5,
        num_inference_steps=6,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(2),
    ).images[0]
    request = RefineRequest(prompt="sharper", image=b64(init), seed=2, strength=0.5, steps=6)
    [got] = served(refined_engine, "refine", [request])
    assert np.abs(got - pixels(want)).max() <= TOLERANCE


def test_a_server_without_a_refiner_refuses_them(engine):  # noqa: F811
    state = ServerState(Settings())
    state.publish(ServedSnapshot(settings=state.snapshot.settings, loaded=True))
    _, _, _, Refined, Refine = bind_image_requests(state)
    with pytest.raises(pydantic.ValidationError, match="no refiner"):
        Refined(prompt="x", **SMALL)
    with pytest.raises(pydantic.ValidationError, match="no refiner"):
        Refine(prompt="x", image=b64(picture(1)))
    with pytest.raises(InvalidArgument, match="no refiner"):  # a direct caller of the engine
        engine.handoff([RefinedRequest(prompt="x", **SMALL)])


def test_bad_handoffs_and_adapters_on_the_refiner_are_refused():
    for handoff in (0.0, 1.0, -0.5, float("nan")):
        with pytest.raises(pydantic.ValidationError) as err:
            RefinedRequest(prompt="x", handoff=handoff, **SMALL)
        assert [loc for loc, _ in errors(err)] == [("handoff",)]
    with pytest.raises(pydantic.ValidationError, match="adapters: the refiner takes none"):
        RefineRequest(prompt="x", image=b64(picture(1)), adapters=[{"name": "edit-style"}])


def test_the_clients_take_the_request_fields():
    import inspect

    from service.client import AsyncClient, Client

    for cls in (Client, AsyncClient):
        for method, model, left_out in (
            (cls.generate_with_refiner, RefinedRequest, set()),
            (cls.refine, RefineRequest, {"adapters"}),
        ):
            params = set(inspect.signature(method).parameters) - {"self"}
            assert params == set(model.model_fields) - left_out, (method, params)

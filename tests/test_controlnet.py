"""ControlNet (models.controlnets, /controlnet through service.image_modes) on the tiny base, on a
CPU: a ControlNet built and imported into the store by the CLI; the served image equals plain
diffusers' StableDiffusionXLControlNetPipeline, alone and batched; scale 0 gives the plain
/generate image; bad input is refused naming the field; a ControlNet of another shape is
refused."""

from __future__ import annotations

import types

import numpy as np
import pydantic
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

from models.cli import main as models_cli
from models.controlnets import controlnet_names, get_controlnet, load_controlnet
from service.schemas import ControlNetRequest, GenerateRequest
from tests.test_image_modes import (  # noqa: F401 (fixtures)
    TOLERANCE,
    b64,
    edit_style,
    engine,
    errors,
    picture,
)

SMALL = {"width": 64, "height": 64, "steps": 4, "guidance": 5.0}


@pytest.fixture(scope="module")
def controlnet(tiny_base):
    assert models_cli(["build-tiny-controlnet", "--base", "sdxl-tiny", "--name", "tiny"]) == 0
    assert models_cli(["build-tiny-controlnet", "--name", "tiny2", "--seed", "1"]) == 0
    return get_controlnet("tiny")


@pytest.fixture(scope="module")
def peer(tiny_base, controlnet):
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_base.path, controlnet=ControlNetModel.from_pretrained(controlnet.path)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def edges(seed: int, size=(64, 64)):
    from PIL import Image

    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    rng = np.random.RandomState(seed)
    for _ in range(6):
        x = rng.randint(0, size[0])
        array[:, x : x + 2] = 255
    return Image.fromarray(array)


def request(prompt: str, control, seed: int, scale: float = 1.0, **fields) -> ControlNetRequest:
    return ControlNetRequest(
        prompt=prompt,
        seed=seed,
        controlnets=[{"name": "tiny", "image": b64(control), "scale": scale}],
        **(SMALL | fields),
    )


def served(engine, requests) -> list[np.ndarray]:  # noqa: F811
    from tests.service_helpers import pixels

    return [pixels(i.image) for r in engine.controlnet(requests) for i in r.images]


def peer_image(pipe, prompt: str, control, seed: int, scale: float) -> np.ndarray:
    from tests.service_helpers import pixels

    image = pipe(
        prompt,
        image=control,
        controlnet_conditioning_scale=scale,
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]
    return pixels(image)


def test_the_served_image_equals_plain_diffusers_alone_and_batched(engine, peer):  # noqa: F811
    control = edges(1)
    want = peer_image(peer, "a street", control, 5, 0.8)
    [alone] = served(engine, [request("a street", control, 5, 0.8)])
    assert np.abs(alone - want).max() <= TOLERANCE
    batch = served(
        engine,
        [
            request("a forest", edges(2), 9, 0.8, num_images=2),
            request("a street", control, 5, 0.8),
        ],
    )
    assert len(batch) == 3 and np.abs(batch[2] - want).max() <= TOLERANCE
    assert np.abs(batch[0] - peer_image(peer, "a forest", edges(2), 9, 0.8)).max() <= TOLERANCE


def test_scale_0_is_the_plain_image_and_a_scale_changes_it(engine):  # noqa: F811
    control = edges(3)
    [zero] = served(engine, [request("a bridge", control, 7, 0.0)])
    [full] = served(engine, [request("a bridge", control, 7, 1.0)])
    from tests.service_helpers import pixels

    [plain] = engine.generate([GenerateRequest(prompt="a bridge", seed=7, **SMALL)])
    plain = pixels(plain.images[0].image)
    assert np.abs(zero - plain).max() <= TOLERANCE
    assert np.abs(full - plain).max() > 5 * TOLERANCE


def test_bad_input_is_refused_naming_the_field(controlnet):
    control = b64(edges(1))
    tiny = {"name": "tiny", "image": control}
    cases = [
        ([{"name": "nope", "image": control}], ("controlnets", 0, "name"), "unknown ControlNet"),
        ([tiny, {**tiny, "name": "tiny2", "scale": 3}], ("controlnets", 1, "scale"), "2"),
        ([{"name": "tiny", "image": "aGVsbG8="}], (), "controlnets[0].image: image does not"),
        (
            [tiny, {"name": "tiny2", "image": b64(edges(1, (128, 32)))}],
            (),
            "controlnets[1].image: 128x32 is far from the output's 64x64",
        ),
        ([tiny, tiny], (), "each ControlNet at most once"),
        ([], ("controlnets",), "at least 1"),
        ([tiny] * 4, ("controlnets",), "at most 3"),
    ]
    for controls, loc, message in cases:
        with pytest.raises(pydantic.ValidationError) as err:
            ControlNetRequest(prompt="x", controlnets=controls, **SMALL)
        [(got_loc, got)] = errors(err)
        assert got_loc == loc and message in got, (got_loc, got)
    # the output's aspect ratio at another size is fine (diffusers resizes it)
    ok = ControlNetRequest(
        prompt="x", controlnets=[{"name": "tiny", "image": b64(edges(1, (128, 128)))}], **SMALL
    )
    assert ok._controls[0].size == (128, 128) and "tiny" in controlnet_names()


def test_a_controlnet_of_another_shape_is_refused(controlnet, engine):  # noqa: F811
    unet = engine.pipe.unet
    other = types.SimpleNamespace(
        config={**unet.config, "cross_attention_dim": 2048}, device=unet.device, dtype=unet.dtype
    )
    with pytest.raises(ValueError, match="does not fit this base: cross_attention_dim"):
        load_controlnet(controlnet, other)


def test_import_controlnet_from_a_folder(controlnet, tmp_path):
    ControlNetModel.from_pretrained(controlnet.path).save_pretrained(tmp_path / "cn")
    assert models_cli(["import-controlnet", str(tmp_path / "cn"), "--name", "copied"]) == 0
    copied = get_controlnet("copied")
    assert copied.metadata["source"] == str(tmp_path / "cn") and "copied" in controlnet_names()


def test_the_clients_take_the_request_fields(controlnet):
    import inspect

    from service.client import AsyncClient, Client, _control_request

    fields = set(ControlNetRequest.model_fields) - {"controlnets"}
    for cls in (Client, AsyncClient):
        params = set(inspect.signature(cls.controlnet).parameters) - {"self"}
        assert params == fields | {"controls"}, params ^ fields
    controls = [("tiny", edges(1), 0.5), ("tiny2", edges(2), 1.5)]
    [body] = _control_request("x", controls, None, {"seed": 2, **SMALL})["requests"]
    parsed = ControlNetRequest(**body)
    assert [c.scale for c in parsed.controlnets] == [0.5, 1.5] and parsed.seed == 2


def test_several_controlnets_equal_diffusers_multicontrolnet(engine, tiny_base, controlnet):  # noqa: F811
    from tests.service_helpers import pixels

    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_base.path,
        controlnet=[
            ControlNetModel.from_pretrained(get_controlnet(name).path) for name in ("tiny", "tiny2")
        ],
    )
    pipe.set_progress_bar_config(disable=True)
    want = pipe(
        "a harbour",
        image=[edges(5), edges(6)],
        controlnet_conditioning_scale=[0.6, 1.2],
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(8),
    ).images[0]
    two = ControlNetRequest(
        prompt="a harbour",
        seed=8,
        controlnets=[
            {"name": "tiny", "image": b64(edges(5)), "scale": 0.6},
            {"name": "tiny2", "image": b64(edges(6)), "scale": 1.2},
        ],
        **SMALL,
    )
    other = two.model_copy(update={"prompt": "a boat", "seed": 1, "num_images": 2})
    other._controls = [edges(7), edges(8)]
    got = served(engine, [other, two])
    assert len(got) == 3 and np.abs(got[2] - pixels(want)).max() <= TOLERANCE
    [one] = served(engine, [request("a harbour", edges(5), 8, 0.6)])
    assert np.abs(got[2] - one).max() > 2 * TOLERANCE  # the second ControlNet took part


def test_controlnets_past_the_bound_are_unloaded_least_recently_used_first(tiny_base, controlnet):
    """BENTOLORA_CONTROLNETS_LOADED=1: using another ControlNet unloads the one loaded (and the
    pipelines holding it); using it again loads it from the store, with the same images."""
    from bentoml.exceptions import InvalidArgument

    from service.engine import Engine
    from service.settings import Settings

    one = Engine(
        Settings(base="sdxl-tiny", clip="clip-tiny", device="cpu", ui=False, controlnets_loaded=1)
    )
    first = served(one, [request("a gate", edges(3), 4)])
    assert one.image_modes.controlnets_loaded() == ["tiny"]
    served(one, [controlled("tiny2")])
    assert one.image_modes.controlnets_loaded() == ["tiny2"]
    assert not any("tiny" in key.split(":")[-1].split("+") for key in one.image_modes._pipes)
    again = served(one, [request("a gate", edges(3), 4)])
    assert np.abs(again[0] - first[0]).max() == 0
    with pytest.raises(InvalidArgument, match="BENTOLORA_CONTROLNETS_LOADED"):
        one.controlnet([controlled("tiny", "tiny2")])
    assert one.image_modes.controlnets_loaded() == ["tiny"]
    one.encoder.close()


def controlled(*names: str) -> ControlNetRequest:
    return ControlNetRequest(
        prompt="a gate",
        seed=4,
        controlnets=[{"name": n, "image": b64(edges(3)), "scale": 1.0} for n in names],
        **SMALL,
    )

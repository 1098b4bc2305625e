"""/img2img and /inpaint in the engine (service.image_modes), against plain diffusers: the same
weights, seed and inputs give the same image, alone or batched with other requests; strength 0
and an all-zero mask give the VAE round trip; bad inputs are refused naming the field. An
engine on the tiny base, on a CPU (the HTTP side: tests/test_image_modes_http.py)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pydantic
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline
from PIL import Image

from models.adapter import save_adapter
from service.engine import Engine
from service.image_modes import steps_run
from service.schemas import Img2ImgRequest, InpaintRequest
from service.settings import Settings
from tests.service_helpers import pixels
from tests.store_helpers import LAYER, tiny_info

TOLERANCE = 2  # as tests/test_service.py: batched matmuls take other BLAS paths
SMALL = {"steps": 4, "guidance": 5.0}


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def picture(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.RandomState(seed)
    small = rng.randint(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.NEAREST)


def half_mask(size=(64, 64)) -> Image.Image:
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[:, size[0] // 2 :] = 255
    return Image.fromarray(mask, "L")


@pytest.fixture(scope="module")
def edit_style(tiny_base):
    """A one-layer adapter with random factors (it visibly changes the tiny base's images)."""
    from models.clip import build_tiny_clip, save_clip

    save_clip(*build_tiny_clip(0), "clip-tiny", source="tiny:seed=0", reuse_identical=True)
    generator = torch.Generator().manual_seed(0)
    return save_adapter(
        "edit-style",
        {
            "unet": {
                f"{LAYER}.lora_A.weight": torch.randn(2, 64, generator=generator),
                f"{LAYER}.lora_B.weight": torch.randn(64, 2, generator=generator),
            }
        },
        tiny_info(tiny_base),
    )


@pytest.fixture(scope="module")
def engine(edit_style):
    engine = Engine(
        Settings(base="sdxl-tiny", clip="clip-tiny", device="cpu", ui=False, warmup=False)
    )
    yield engine
    engine.encoder.close()


@pytest.fixture(scope="module")
def peers(tiny_base, edit_style):
    """Plain diffusers' image-to-image and inpainting pipelines on the same store folders."""
    img2img = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_base.path)
    img2img.load_lora_weights(
        str(edit_style.path),
        weight_name="pytorch_lora_weights.safetensors",
        adapter_name="edit-style",
    )
    img2img.set_progress_bar_config(disable=True)
    inpaint = StableDiffusionXLInpaintPipeline.from_pipe(img2img)
    inpaint.set_progress_bar_config(disable=True)
    return {"img2img": img2img, "inpaint": inpaint}


def peer_image(pipe, *, seed: int, adapters: dict[str, float] | None = None, **kwargs):
    if adapters:
        pipe.enable_lora()
        pipe.set_adapters(list(adapters), adapter_weights=list(adapters.values()))
    else:
        pipe.disable_lora()
    image = pipe(
        generator=torch.Generator().manual_seed(seed),
        num_inference_steps=SMALL["steps"],
        guidance_scale=SMALL["guidance"],
        **kwargs,
    ).images[0]
    return pixels(image)


def served(engine: Engine, mode: str, requests: list) -> list[np.ndarray]:
    responses = getattr(engine, mode)(requests)
    return [pixels(image.image) for response in responses for image in response.images]


def img2img(prompt: str, image: Image.Image, **fields) -> Img2ImgRequest:
    return Img2ImgRequest(prompt=prompt, image=b64(image), **(SMALL | fields))


def inpaint(prompt: str, image: Image.Image, mask: Image.Image, **fields) -> InpaintRequest:
    return InpaintRequest(prompt=prompt, image=b64(image), mask=b64(mask), **SMALL, **fields)


@pytest.mark.parametrize("adapters", [{}, {"edit-style": 0.8}], ids=["base", "adapter"])
def test_img2img_equals_plain_diffusers_alone_and_batched(engine, peers, adapters):
    init = picture(1)
    choice = [{"name": n, "scale": s} for n, s in adapters.items()]
    want = peer_image(
        peers["img2img"], seed=7, adapters=adapters, prompt="a red door", image=init, strength=0.6
    )
    [alone] = served(
        engine, "img2img", [img2img("a red door", init, seed=7, strength=0.6, adapters=choice)]
    )
    assert np.abs(alone - want).max() <= TOLERANCE
    assert np.abs(alone - pixels(init)).max() > 20  # it did redraw
    # batched with other requests (another image, two images, another strength, no adapter)
    others = [
        img2img("stripes", picture(2), seed=3, strength=0.6, adapters=choice, num_images=2),
        img2img("a red door", init, seed=7, strength=0.6, adapters=choice),
        img2img("a cat", picture(3), seed=5, strength=0.9),
    ]
    batch = served(engine, "img2img", others)
    assert len(batch) == 4
    assert np.abs(batch[2] - want).max() <= TOLERANCE
    want_second = peer_image(
        peers["img2img"],
        seed=4,
        adapters=adapters,
        prompt="stripes",
        image=picture(2),
        strength=0.6,
    )
    assert np.abs(batch[1] - want_second).max() <= TOLERANCE


def test_an_adapter_changes_the_edited_image(engine):
    init = picture(4)
    [plain] = served(engine, "img2img", [img2img("a tree", init, seed=2, strength=1.0)])
    [styled] = served(
        engine,
        "img2img",
        [img2img("a tree", init, seed=2, strength=1.0, adapters=[{"name": "edit-style"}])],
    )
    assert np.abs(plain - styled).max() > 2 * TOLERANCE


@pytest.mark.parametrize("adapters", [{}, {"edit-style": 1.0}], ids=["base", "adapter"])
def test_inpaint_equals_plain_diffusers_alone_and_batched(engine, peers, adapters):
    init, mask = picture(5), half_mask()
    choice = [{"name": n, "scale": s} for n, s in adapters.items()]
    want = peer_image(
        peers["inpaint"],
        seed=11,
        adapters=adapters,
        prompt="a window",
        image=init,
        mask_image=mask,
        strength=0.9,
    )
    request = inpaint("a window", init, mask, seed=11, strength=0.9, adapters=choice)
    [alone] = served(engine, "inpaint", [request])
    assert np.abs(alone - want).max() <= TOLERANCE
    batch = served(
        engine,
        "inpaint",
        [inpaint("x", picture(6), half_mask(), seed=1, strength=0.9, adapters=choice), request],
    )
    assert np.abs(batch[1] - want).max() <= TOLERANCE


def round_trip(pipe, image: Image.Image, seed: int) -> np.ndarray:
    """The VAE round trip by hand: encode, a posterior sample from the seed's generator, decode."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        latent = pipe.vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(seed))
        out = pipe.vae.decode(latent).sample
    array = ((out[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return array.astype(np.int16)


def test_strength_0_returns_the_vae_round_trip(engine, peers):
    init = picture(7)
    want = round_trip(peers["img2img"], init, 9)
    for request in (
        img2img("anything", init, seed=9, strength=0.0),
        img2img("anything", init, seed=9, strength=0.2),  # int(4 × 0.2) = 0 steps
    ):
        assert steps_run(request) == 0
        [got] = served(engine, "img2img", [request])
        assert np.abs(got - want).max() <= TOLERANCE
    [got] = served(engine, "inpaint", [inpaint("x", init, half_mask(), seed=9, strength=0.0)])
    assert np.abs(got - want).max() <= TOLERANCE


def test_an_all_zero_mask_leaves_the_vae_round_trip(engine, peers):
    init = picture(8)
    black = Image.new("L", (64, 64), 0)
    [got] = served(engine, "inpaint", [inpaint("a dog", init, black, seed=3, strength=0.9)])
    assert np.abs(got - round_trip(peers["img2img"], init, 3)).max() <= TOLERANCE


def test_micro_conditioning_is_passed_as_diffusers_takes_it(engine, peers):
    init = picture(9)
    micro = {
        "original_size": (256, 128),
        "crops_coords_top_left": (16, 8),
        "target_size": (128, 128),
        "negative_original_size": (32, 32),
        "negative_crops_coords_top_left": (0, 4),
        "negative_target_size": (64, 64),
    }
    common = {"prompt": "a boat", "negative_prompt": "fog", "image": init, "strength": 0.8}
    want = peer_image(peers["img2img"], seed=6, **common, **micro)
    default = peer_image(peers["img2img"], seed=6, **common)
    [got] = served(
        engine,
        "img2img",
        [img2img("a boat", init, negative_prompt="fog", seed=6, strength=0.8, **micro)],
    )
    [plain] = served(
        engine, "img2img", [img2img("a boat", init, negative_prompt="fog", seed=6, strength=0.8)]
    )
    assert np.abs(got - want).max() <= TOLERANCE
    assert np.abs(plain - default).max() <= TOLERANCE
    assert np.abs(got - plain).max() > 2 * TOLERANCE  # the conditioning took effect
    mask = half_mask()
    want = peer_image(peers["inpaint"], seed=6, mask_image=mask, **common, **micro)
    [got] = served(
        engine,
        "inpaint",
        [inpaint("a boat", init, mask, negative_prompt="fog", seed=6, strength=0.8, **micro)],
    )
    assert np.abs(got - want).max() <= TOLERANCE


def errors(err: pytest.ExceptionInfo) -> list[tuple[tuple, str]]:
    return [(e["loc"], e["msg"].removeprefix("Value error, ")) for e in err.value.errors()]


def test_bad_inputs_are_refused_naming_the_field():
    image = b64(picture(1))
    cases = [
        (
            dict(image=image, mask=b64(half_mask((64, 72)))),
            "mask: 64x72; it must be the image's size",
        ),
        (dict(image="bm90IGFuIGltYWdl", mask=image), "image: image does not decode"),
        (dict(image=image, mask="%%%"), "mask: image is not valid base64"),
        (dict(image=b64(picture(1, (60, 64))), mask=image), "image: 60x64; both sides must be"),
        (dict(image=image, mask=image, width=128), "image: 64x64, but width x height is 128x64"),
    ]
    for fields, message in cases:
        with pytest.raises(pydantic.ValidationError) as err:
            InpaintRequest(prompt="x", **fields)
        assert any(message in msg for _, msg in errors(err)), (fields.keys(), errors(err))
    for strength in (-0.1, 1.5, float("nan")):
        with pytest.raises(pydantic.ValidationError) as err:
            Img2ImgRequest(prompt="x", image=image, strength=strength)
        assert [loc for loc, _ in errors(err)] == [("strength",)]
    with pytest.raises(pydantic.ValidationError) as err:
        Img2ImgRequest(prompt="x", image=image, original_size=(0, 64))
    assert errors(err)[0][0][0] == "original_size"
    with pytest.raises(pydantic.ValidationError, match="go together"):
        Img2ImgRequest(prompt="x", image=image, negative_original_size=(64, 64))
    ok = InpaintRequest(prompt="x", image=image, mask=image)
    assert (ok.width, ok.height, ok.strength) == (64, 64, 1.0)
    assert ok.micro_conditioning() == {}


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_the_clients_take_exactly_the_request_fields(mode):
    """Client.img2img/inpaint (sync and async): one keyword per field of the server's request
    model, images as PIL images; the body they send is what the model accepts."""
    import inspect

    from service.client import AsyncClient, Client, _mode_request

    model = {"img2img": Img2ImgRequest, "inpaint": InpaintRequest}[mode]
    for cls in (Client, AsyncClient):
        params = set(inspect.signature(getattr(cls, mode)).parameters) - {"self"}
        assert params == set(model.model_fields), (cls, params ^ set(model.model_fields))
    images = {"image": picture(1)} | ({"mask": half_mask()} if mode == "inpaint" else {})
    fields = {"strength": 0.5, "seed": 3, "original_size": (128, 128), "width": None}
    [body] = _mode_request("a cat", images, {"edit-style": 0.5}, fields)["requests"]
    request = model(**body)
    assert request.strength == 0.5 and request.original_size == (128, 128)
    assert request.width == 64 and request.adapters[0].scale == 0.5


def test_admission_counts_the_steps_run_on_the_init_images_pixels():
    """/img2img and /inpaint are queued and their work counted as /generate's is (images ×
    steps × pixels / 1024²), with the steps diffusers runs, int(steps × strength), at least
    one, and the pixels of the init image read from its header."""
    import json

    from service.admission import QUEUED_PATHS, WORK_PATHS, measure

    assert {"/img2img", "/inpaint"} <= QUEUED_PATHS & WORK_PATHS
    image = b64(picture(1, (256, 128)))
    entries = [
        {"prompt": "x", "image": image, "steps": 10, "strength": 0.5, "num_images": 2},
        {"prompt": "x", "image": image, "steps": 10, "strength": 0.0},
        {"prompt": "x", "image": image, "steps": 10},  # img2img's default strength, 0.8
    ]
    demand = measure("/img2img", json.dumps({"requests": entries}).encode())
    unit = 256 * 128 / 1024**2
    assert demand.items == 3 and demand.images == 4
    assert demand.work == pytest.approx((2 * 5 + 1 + 8) * unit)
    inpaint_entry = {"prompt": "x", "image": image, "mask": image, "steps": 10}  # strength 1
    assert measure(
        "/inpaint", json.dumps({"requests": [inpaint_entry]}).encode()
    ).work == pytest.approx(10 * unit)
    broken = {"prompt": "x", "image": "not base64", "steps": 10, "strength": "lots"}
    assert measure("/img2img", json.dumps({"requests": [broken]}).encode()).work == 8.0


def test_a_call_whose_clients_all_left_stops_at_the_next_step(engine):
    """A synchronous request whose client disconnects (service.batcher sets its `_gone`) stops
    costing GPU time at the next denoising step: the call raises out of the pipeline there."""
    import threading

    request = img2img("a lake", picture(10), seed=1, strength=1.0, steps=40)
    gone = threading.Event()
    request._gone = gone
    steps = []

    def on_step(pipe, step, timestep, kwargs):
        steps.append(step)
        if len(steps) == 3:
            gone.set()
        return kwargs

    [response] = engine.image_modes.run("img2img", [request], on_step=on_step)
    assert response.images == [] and steps == [0, 1, 2]  # step 3 ran, then the call stopped
    assert engine._lock.acquire(timeout=1)
    engine._lock.release()


def test_image_modes_interleave_with_step_scheduled_generation(edit_style):
    """With BENTOLORA_SCHEDULING=step, /generate's images advance a step at a time under the
    engine's pipeline lock while an img2img call (another adapter set) takes the lock between
    two of their steps: each gets the image it gets alone (the adapters are re-activated by
    whoever holds the lock)."""
    import concurrent.futures

    from service.schemas import GenerateRequest

    step_engine = Engine(
        Settings(
            base="sdxl-tiny",
            clip="clip-tiny",
            device="cpu",
            ui=False,
            warmup=False,
            scheduling="step",
        )
    )
    try:
        styled = [{"name": "edit-style", "scale": 1.0}]
        generate = GenerateRequest(
            prompt="a hill", seed=3, width=64, height=64, steps=30, adapters=styled
        )
        edit = img2img("a lake", picture(11), seed=4, strength=1.0, steps=8)
        [alone_generated] = step_engine.generate([generate])[0].images
        [alone_edited] = served(step_engine, "img2img", [edit])
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(step_engine.generate, [generate])
            while step_engine.live.progress[0] < 3:  # generation under way
                pass
            [edited] = served(step_engine, "img2img", [edit])
            assert not future.done()  # the edit ran between two of the generation's steps
            [generated] = future.result(timeout=300)[0].images
        assert np.abs(edited - alone_edited).max() <= TOLERANCE
        assert np.abs(pixels(generated.image) - pixels(alone_generated.image)).max() <= TOLERANCE
    finally:
        step_engine.steps.stop()
        step_engine.encoder.close()

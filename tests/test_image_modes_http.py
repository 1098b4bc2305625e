"""/img2img and /inpaint over real HTTP (a `bentoml serve` on loopback, tiny models, CPU): the
Python clients get plain diffusers' images, concurrent requests share pipeline calls and each
still gets its own image, and bad input is a 400 naming the field, never a 5xx."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from service.client import AsyncClient, Client
from tests.service_helpers import pixels, server_env, start_server, stop_server
from tests.test_image_modes import (  # noqa: F401 (fixtures)
    TOLERANCE,
    b64,
    edit_style,
    half_mask,
    peer_image,
    peers,
    picture,
)

pytestmark = pytest.mark.slow
SMALL = {"steps": 4, "guidance": 5.0}


@pytest.fixture(scope="module")
def server(edit_style, tmp_path_factory):  # noqa: F811
    from models.cli import main as models_cli

    assert models_cli(["build-tiny-refiner", "--base", "sdxl-tiny"]) == 0
    env = server_env() | {"BENTOLORA_REFINER": "sdxl-tiny-refiner"}
    proc, url = start_server(env, tmp_path_factory.mktemp("modes") / "server.log")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    with Client(server, timeout=120) as c:
        yield c


def post(server: str, path: str, bodies: list[dict]) -> list[dict]:
    request = urllib.request.Request(
        server + path,
        data=json.dumps({"requests": bodies}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def test_the_clients_get_plain_diffusers_images(client, server, peers):  # noqa: F811
    init, mask = picture(21), half_mask()
    adapters = {"edit-style": 0.7}
    [got] = client.img2img("a house", init, strength=0.7, seed=4, adapters=adapters, **SMALL)
    want = peer_image(
        peers["img2img"], seed=4, adapters=adapters, prompt="a house", image=init, strength=0.7
    )
    assert np.abs(pixels(got.image) - want).max() <= TOLERANCE
    assert got.settings["mode"] == "img2img" and got.settings["strength"] == 0.7
    assert "image" not in got.settings and got.image.size == (64, 64)
    assert got.adapters[0]["name"] == "edit-style"

    async def inpaint():
        async with AsyncClient(server, timeout=120) as c:
            return await c.inpaint("a roof", init, mask, strength=0.9, seed=8, **SMALL)

    [got] = asyncio.run(inpaint())
    want = peer_image(
        peers["inpaint"], seed=8, prompt="a roof", image=init, mask_image=mask, strength=0.9
    )
    assert np.abs(pixels(got.image) - want).max() <= TOLERANCE
    assert got.settings["mode"] == "inpaint" and "mask" not in got.settings


def test_concurrent_requests_share_pipeline_calls_and_each_gets_its_own_image(server):
    bodies = [
        {"prompt": f"p{i}", "image": b64(picture(30 + i)), "seed": i, "strength": 0.5, **SMALL}
        | ({"adapters": [{"name": "edit-style"}]} if i % 3 == 0 else {})
        for i in range(8)
    ]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda body: post(server, "/img2img", [body])[0], bodies))
    alone = [post(server, "/img2img", [body])[0] for body in bodies]
    assert max(i["timings"]["batch_requests"] for r in together for i in r["images"]) > 1
    assert max(i["timings"]["batch_images"] for r in together for i in r["images"]) > 1
    for t, a in zip(together, alone, strict=True):
        [ti], [ai] = t["images"], a["images"]
        assert ti["seed"] == ai["seed"]
        assert np.abs(pixels(ti["image"]) - pixels(ai["image"])).max() <= TOLERANCE


def test_bad_input_is_a_400_naming_the_field(server):
    image = b64(picture(1))
    cases = [
        ("/inpaint", {"image": image, "mask": b64(half_mask((64, 72)))}, "mask: 64x72"),
        ("/inpaint", {"image": image, "mask": "aGVsbG8="}, "mask: image does not decode"),
        ("/img2img", {"image": "not an image"}, "image: image is not valid base64"),
        ("/img2img", {"image": image, "strength": 1.5}, "strength"),
        ("/inpaint", {"image": image, "mask": image, "strength": -0.5}, "strength"),
        ("/img2img", {"image": image, "original_size": [64]}, "original_size"),
        ("/img2img", {"prompt": "x"}, "image"),
    ]
    for path, fields, message in cases:
        with pytest.raises(urllib.error.HTTPError) as err:
            post(server, path, [{"prompt": "x", **SMALL, **fields}])
        body = err.value.read().decode()
        assert err.value.code == 400, (path, fields.keys(), err.value.code, body)
        assert message in body, (message, body)


def test_the_new_endpoints_take_json_only(server):
    for path in ("/img2img", "/inpaint", "/job/submit"):
        request = urllib.request.Request(
            server + path,
            data=b"--x--",
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=60)
        assert err.value.code == 415, path


def test_controlnet_over_http_equals_plain_diffusers(server, client):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    from models.bases import get_base
    from models.cli import main as models_cli
    from models.controlnets import get_controlnet
    from tests.test_controlnet import edges
    from tests.test_controlnet import peer_image as controlnet_peer_image

    assert models_cli(["build-tiny-controlnet", "--name", "tiny"]) == 0  # while it serves
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        get_base("sdxl-tiny").path,
        controlnet=ControlNetModel.from_pretrained(get_controlnet("tiny").path),
    )
    pipe.set_progress_bar_config(disable=True)
    [got] = client.controlnet(
        "a road", [("tiny", edges(4), 0.7)], seed=3, width=64, height=64, **SMALL
    )
    want = controlnet_peer_image(pipe, "a road", edges(4), 3, 0.7)
    assert np.abs(pixels(got.image) - want).max() <= TOLERANCE
    assert got.settings["controlnets"] == [{"name": "tiny", "scale": 0.7}]
    listing = client.controlnets()
    assert listing["refiner"] == "sdxl-tiny-refiner"
    [row] = [c for c in listing["controlnets"] if c["name"] == "tiny"]
    assert row["version"] == get_controlnet("tiny").version
    body = {"prompt": "x", **SMALL, "controlnets": [{"name": "nope", "image": b64(edges(4))}]}
    with pytest.raises(urllib.error.HTTPError) as err:
        post(server, "/controlnet", [body])
    assert err.value.code == 400 and "unknown ControlNet 'nope'" in err.value.read().decode()


def test_the_refiner_over_http(client, server):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from models.bases import get_base
    from models.store import get_entry
    from tests.test_refiner import ensemble

    base = StableDiffusionXLPipeline.from_pretrained(get_base("sdxl-tiny").path)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        get_entry("sdxl-tiny-refiner", kind="refiner").path
    )
    [got] = client.generate_with_refiner(
        "a castle", handoff=0.7, seed=4, width=64, height=64, steps=6, guidance=5.0
    )
    assert np.abs(pixels(got.image) - ensemble((base, refiner), "a castle", 4, 0.7)).max() <= 2
    assert got.settings["handoff"] == 0.7
    [refined] = client.refine("sharper", got.image, strength=0.5, seed=2, steps=6)
    assert refined.image.size == (64, 64) and refined.settings["mode"] == "refine"
    for path, fields, message in [
        ("/generate_with_refiner", {"handoff": 1.0}, "handoff"),
        ("/refine", {"image": b64(picture(1)), "adapters": [{"name": "edit-style"}]}, "adapters"),
    ]:
        with pytest.raises(urllib.error.HTTPError) as err:
            post(server, path, [{"prompt": "x", **SMALL, **fields}])
        assert err.value.code == 400 and message in err.value.read().decode()

"""The service over real HTTP: a `bentoml serve` on loopback with the tiny models, on a CPU."""

from __future__ import annotations

import concurrent.futures
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image

from models.adapter import get_adapter
from models.bases import save_base
from models.clip import ClipScorer, build_tiny_clip, save_clip
from models.tiny import build_tiny_pipeline
from service.client import Client
from tests.service_helpers import pixels, server_env, start_server, stop_server
from tests.store_helpers import attention_adapter, one_layer_adapter
from train.config import TrainConfig
from train.loop import train

pytestmark = pytest.mark.slow

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv_in", "conv_out", "proj_in", "proj_out")
SMALL = {"width": 64, "height": 64, "steps": 4, "guidance": 5.0}


@pytest.fixture(scope="module")
def server(tiny_base, sample_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("service")
    save_clip(*build_tiny_clip(0), "clip-tiny", source="tiny:seed=0")
    for name, seed in (("red", 1), ("blue", 2)):
        train(
            TrainConfig(
                base="sdxl-tiny",
                data_dir=str(sample_dir),
                name=name,
                output_dir=str(tmp),
                cache_dir=str(tmp / "cache"),
                resolution=64,
                rank=4,
                alpha=4.0,
                learning_rate=5e-3,
                batch_size=4,
                max_steps=25,
                seed=seed,
                target_modules=TARGETS,
                tensorboard=False,
            )
        )
    other = save_base(build_tiny_pipeline(seed=3), "sdxl-tiny-elsewhere", source="tiny:seed=3")
    one_layer_adapter("elsewhere", other)
    one_layer_adapter("no-loss", tiny_base)  # no training, so its final loss is NaN
    attention_adapter(
        "pinned", tiny_base, StableDiffusionXLPipeline.from_pretrained(tiny_base.path), 7
    )
    proc, url = start_server(server_env(), tmp / "server.log")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    with Client(server, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_base):
    """Plain diffusers on the same store folders: the peer the service must match."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_base.path)
    for name in ("red", "blue"):
        pipe.load_lora_weights(
            str(get_adapter(name).path),
            weight_name="pytorch_lora_weights.safetensors",
            adapter_name=name,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The samplers as diffusers documents them (A1111 names), written out here rather than taken from
# service/schedulers.py, so a wrong mapping there shows: each built from the base's own config.
DIFFUSERS_SCHEDULERS = {
    "euler": lambda config: EulerDiscreteScheduler.from_config(config),
    "euler_a": lambda config: EulerAncestralDiscreteScheduler.from_config(config),
    "dpmpp_2m_karras": lambda config: DPMSolverMultistepScheduler.from_config(
        config, use_karras_sigmas=True, algorithm_type="dpmsolver++"
    ),
    "ddim": lambda config: DDIMScheduler.from_config(config),
    "unipc": lambda config: UniPCMultistepScheduler.from_config(config),
}


def diffusers_image(
    pipe,
    prompt: str,
    seed: int,
    adapters: dict[str, float],
    *,
    negative_prompt: str | None = None,
    scheduler: str | None = None,
) -> np.ndarray:
    if adapters:
        pipe.enable_lora()
        pipe.set_adapters(list(adapters), adapter_weights=list(adapters.values()))
    else:
        pipe.disable_lora()
    own = pipe.scheduler
    if scheduler is not None:
        pipe.scheduler = DIFFUSERS_SCHEDULERS[scheduler](own.config)
    try:
        image = pipe(
            prompt,
            negative_prompt=negative_prompt,
            width=64,
            height=64,
            num_inference_steps=4,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
    finally:
        pipe.scheduler = own
    return pixels(image)


# Same weights, seed and sampler: what can differ is float summation order (a batch of several
# images takes other BLAS paths than one), which moves a pixel by at most a level or two of 255.
TOLERANCE = 2


@pytest.mark.parametrize(
    "adapters", [{}, {"red": 1.0}, {"red": 0.6, "blue": 0.8}], ids=["base", "one", "mix"]
)
def test_served_image_equals_plain_diffusers(client, reference, adapters):
    [got] = client.generate(
        "a red circle on a blue background", seed=42, adapters=adapters, **SMALL
    )
    want = diffusers_image(reference, "a red circle on a blue background", 42, adapters)
    assert np.abs(pixels(got.image) - want).max() <= TOLERANCE
    assert got.seed == 42
    assert [a["name"] for a in got.adapters] == list(adapters)
    assert all(a["version"] == get_adapter(a["name"]).version for a in got.adapters)


def test_adapter_changes_the_image_and_scale_zero_is_the_base(client):
    base = pixels(client.generate("a square", seed=5, **SMALL)[0].image)
    red = pixels(client.generate("a square", seed=5, adapters={"red": 1.0}, **SMALL)[0].image)
    zero = pixels(client.generate("a square", seed=5, adapters={"red": 0.0}, **SMALL)[0].image)
    assert np.abs(red - base).max() > 20
    assert np.abs(zero - base).max() <= TOLERANCE


def test_seed_is_random_when_absent_and_always_returned(client):
    a = client.generate("x", num_images=2, **SMALL)
    b = client.generate("x", **SMALL)
    assert len(a) == 2 and a[1].seed == (a[0].seed + 1) % 2**32
    assert b[0].seed != a[0].seed
    again = client.generate("x", seed=a[1].seed, **SMALL)[0]
    assert np.abs(pixels(again.image) - pixels(a[1].image)).max() <= TOLERANCE


def test_negative_prompt_changes_the_image_as_in_plain_diffusers(client, reference):
    prompt, negative = "a red circle on a blue background", "green stripes, blurry"
    [plain] = client.generate(prompt, seed=11, **SMALL)
    [steered] = client.generate(prompt, negative_prompt=negative, seed=11, **SMALL)
    assert steered.settings["negative_prompt"] == negative
    assert np.abs(pixels(steered.image) - pixels(plain.image)).max() > 20
    want = diffusers_image(reference, prompt, 11, {}, negative_prompt=negative)
    assert np.abs(pixels(steered.image) - want).max() <= TOLERANCE
    # and with an adapter: the negative prompt goes through the same (fused) weights
    [mixed] = client.generate(
        prompt, negative_prompt=negative, seed=11, adapters={"red": 0.7}, **SMALL
    )
    want = diffusers_image(reference, prompt, 11, {"red": 0.7}, negative_prompt=negative)
    assert np.abs(pixels(mixed.image) - want).max() <= TOLERANCE


@pytest.fixture(scope="module")
def scheduler_images(client) -> dict[str, np.ndarray]:
    """The same request (seed, prompt, size, steps) under each scheduler, as PNG (lossless: the
    pixels compared with diffusers are the ones the pipeline made)."""
    images = {}
    for name in DIFFUSERS_SCHEDULERS:
        [got] = client.generate("a red circle", seed=1, scheduler=name, **SMALL)
        assert got.settings["scheduler"] == name and got.image.size == (64, 64)
        images[name] = pixels(got.image)
    return images


@pytest.mark.parametrize("scheduler", list(DIFFUSERS_SCHEDULERS))
def test_every_scheduler_matches_plain_diffusers_and_differs_from_the_others(
    scheduler_images, reference, scheduler
):
    got = scheduler_images[scheduler]
    want = diffusers_image(reference, "a red circle", 1, {}, scheduler=scheduler)
    assert np.abs(got - want).max() <= TOLERANCE
    for other, image in scheduler_images.items():
        if other != scheduler:
            assert np.abs(got - image).max() > 10 * TOLERANCE, (scheduler, other)


def test_output_formats(client):
    for fmt, pil in (("webp", "WEBP"), ("jpeg", "JPEG"), ("png", "PNG")):
        [got] = client.generate("x", seed=1, output_format=fmt, **SMALL)
        assert got.format == fmt and got.image.format == pil and got.image.size == (64, 64)


def post_generate(server: str, body: dict) -> dict:
    """One /generate request over plain HTTP; its response (raises HTTPError on 4xx/5xx)."""
    request = urllib.request.Request(
        server + "/generate",
        data=json.dumps({"requests": [body]}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())[0]


def test_a_response_names_what_gives_the_same_image_again(server, tiny_base):
    body = {"prompt": "a pinned circle", **SMALL, "adapters": [{"name": "pinned", "scale": 0.9}]}
    [first] = post_generate(server, body)["images"]
    served = get_adapter("pinned")
    assert first["adapters"] == [
        {
            "name": "pinned",
            "version": served.version,
            "content_hash": served.metadata["content_hash"],
            "scale": 0.9,
        }
    ]
    settings = first["settings"]
    for field in ("seed", "scheduler", "width", "height", "steps", "guidance", "prompt"):
        assert field in settings, field
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_base.path)
    newer = attention_adapter("pinned", tiny_base, pipe, 8)  # a newer version, not served yet
    again = {k: v for k, v in settings.items() if k != "base"} | {
        "adapters": [{k: a[k] for k in ("name", "version", "scale")} for a in first["adapters"]]
    }
    [second] = post_generate(server, again)["images"]
    assert second["adapters"] == first["adapters"]
    assert np.array_equal(pixels(second["image"]), pixels(first["image"]))
    # The newer version, pinned by its version, is served although it is not the current one.
    again["adapters"][0]["version"] = newer.version
    [third] = post_generate(server, again)["images"]
    assert third["adapters"][0]["version"] == newer.version
    assert np.abs(pixels(third["image"]) - pixels(first["image"])).max() > 10
    again["adapters"][0]["version"] = "nosuchversion1"
    with pytest.raises(urllib.error.HTTPError) as err:
        post_generate(server, again)
    assert err.value.code == 400
    assert "has no version 'nosuchversion1'" in err.value.read().decode()


def test_sixteen_concurrent_clients_are_batched_and_each_gets_its_own_image(server):
    settings = [
        {
            "prompt": f"prompt {i}",
            "seed": 100 + i,
            "adapters": [{"name": "red", "scale": 1.0}] if i % 3 == 0 else [],
            "scheduler": "euler" if i % 2 else "ddim",
            "num_images": 1 + i % 2,
            **SMALL,
        }
        for i in range(16)
    ]

    def call(body: dict) -> dict:
        return post_generate(server, body)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(call, settings))
    alone = [call(body) for body in settings]
    assert max(image["timings"]["batch_requests"] for r in together for image in r["images"]) > 1
    assert all(image["timings"]["batch_requests"] == 1 for r in alone for image in r["images"])
    for body, t, a in zip(settings, together, alone, strict=True):
        assert len(t["images"]) == body["num_images"]
        for ti, ai in zip(t["images"], a["images"], strict=True):
            assert ti["seed"] == ai["seed"]
            assert np.abs(pixels(ti["image"]) - pixels(ai["image"])).max() <= TOLERANCE
    metrics = urllib.request.urlopen(server + "/metrics").read().decode()
    assert "bentolora_batch_requests" in metrics  # requests per batch (service/metrics.py)


def test_score_matches_an_independent_clip_computation(client, tiny_base):
    from models.store import get_entry

    generated = client.generate("red", seed=9, **SMALL)[0].image
    images = [generated, Image.new("RGB", (64, 64), (20, 40, 230))]
    texts = ["a red circle", "a blue square", "stripes"]
    got = client.score(images, texts)
    # By hand with transformers: embeddings, cosine, 100 × max(cos, 0).
    scorer = ClipScorer.from_store("clip-tiny")
    model = scorer.model
    with torch.no_grad():
        img = model.visual_projection(
            model.vision_model(pixel_values=scorer.preprocess(images)).pooler_output
        )
        tok = scorer.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
        txt = model.text_projection(model.text_model(**tok).pooler_output)
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    want = (100 * (img @ txt.T)).clamp(min=0)
    assert np.allclose(got.clip_scores, want.numpy(), atol=1e-3)
    assert np.allclose(np.diag(got.image_similarity), 1.0, atol=1e-5)
    # A random CLIP knows no captions, so "matching" cannot be shown semantically; what must
    # hold is that the same image scores the same and is its own nearest neighbour.
    twice = client.score([images[0], images[0], images[1]], texts[:1])
    assert np.allclose(twice.clip_scores[0], twice.clip_scores[1], atol=1e-4)
    assert twice.image_similarity[0][1] > twice.image_similarity[0][2]
    assert get_entry("clip-tiny").labels["bentolora.kind"] == "clip"


def test_adapters_endpoint_lists_what_is_served(client):
    rows = {row["name"]: row for row in client.adapters()}
    # The session's store also holds adapters other tests trained on sdxl-tiny; never the one made
    # for another base.
    assert {"red", "blue"} <= set(rows) and "elsewhere" not in rows
    assert rows["no-loss"]["final_loss"] is None  # stored with NaN: listed, as null
    red = rows["red"]
    assert red["version"] == get_adapter("red").version and red["rank"] == 4
    assert red["targets"] == list(TARGETS) and red["validation"]["fixed_noise_loss"] > 0
    client.generate("a tier check", adapters={"blue": 1.0}, **SMALL)
    rows = {row["name"]: row for row in client.adapters()}
    assert rows["blue"]["tier"] == "device"  # just used: its factors are on the device
    assert rows["no-loss"]["tier"] == "store"  # never used: only in the store


def test_health_endpoints(server):
    for path in ("/livez", "/readyz", "/metrics", "/docs.json", "/"):  # "/" is the Swagger UI
        assert urllib.request.urlopen(server + path).status == 200


def test_command_line_generation(server, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cat.webp"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "--url",
            server,
            "generate",
            "a cat",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
            "--seed",
            "3",
            "--adapter",
            "red=0.5",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "seed 3" in result.stdout and Image.open(out).format == "WEBP"
    bad = subprocess.run(
        [sys.executable, "-m", "service.cli", "--url", server, "generate", " "],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "prompt is empty" in bad.stderr

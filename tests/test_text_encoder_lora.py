"""Text-encoder LoRA end to end with the locked versions: trained here, stored, read by plain
diffusers, and served over HTTP with the image plain diffusers renders from the same file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from models.adapter import get_adapter, load_adapter_weights, weights_path
from models.clip import build_tiny_clip, save_clip
from service.client import Client
from tests.service_helpers import pixels, server_env, start_server, stop_server
from train.config import TrainConfig
from train.loop import train

pytestmark = pytest.mark.slow

PROMPT = "a red circle on a blue background"
SMALL = {"width": 64, "height": 64, "steps": 4, "guidance": 5.0}


def render(pipe, seed: int) -> np.ndarray:
    image = pipe(
        PROMPT,
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]
    return pixels(image)


def test_a_trained_text_encoder_lora_is_served_as_diffusers_renders_it(
    tiny_base, sample_dir, tmp_path
):
    save_clip(*build_tiny_clip(0), "clip-tiny", source="tiny:seed=0", reuse_identical=True)
    train(
        TrainConfig(
            base="sdxl-tiny",
            data_dir=str(sample_dir),
            name="te-served",
            output_dir=str(tmp_path / "runs"),
            cache_dir=str(tmp_path / "cache"),
            resolution=64,
            rank=4,
            alpha=4.0,
            learning_rate=5e-3,
            batch_size=4,
            max_steps=20,
            text_encoder_lora=True,
            cache_text_embeddings=False,
            validation_prompts=(),
            tensorboard=False,
        )
    )
    entry = get_adapter("te-served")
    assert entry.metadata["text_encoder_lora"] is True
    parts = {key.split(".", 1)[0] for key in load_adapter_weights(weights_path(entry))}
    assert parts == {"unet", "text_encoder", "text_encoder_2"}

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_base.path)
    pipe.set_progress_bar_config(disable=True)
    base = render(pipe, seed=3)
    pipe.load_lora_weights(
        str(entry.path), weight_name="pytorch_lora_weights.safetensors", adapter_name="te"
    )
    want = render(pipe, seed=3)
    # the text-encoder half matters: without it the image is another one
    pipe.text_encoder.disable_adapters()
    pipe.text_encoder_2.disable_adapters()
    unet_only = render(pipe, seed=3)
    assert np.abs(want - unet_only).max() > 2
    assert np.abs(want - base).max() > 2

    proc, url = start_server(server_env(), tmp_path / "server.log")
    try:
        with Client(url, timeout=120) as client:
            [got] = client.generate(PROMPT, seed=3, adapters={"te-served": 1.0}, **SMALL)
    finally:
        stop_server(proc)
    assert got.adapters[0]["version"] == entry.version
    assert np.abs(pixels(got.image) - want).max() <= 2

"""The full-size random SDXL has the published SDXL 1.0 shapes (built on the meta device)."""

from __future__ import annotations

import os

import pytest
import torch

from models.full_size import build_full_size_pipeline, parameter_counts

os.environ["HF_HUB_OFFLINE"] = "1"  # conftest sets it first; nothing here may touch the hub

PUBLISHED_MILLIONS = {"unet": 2567.5, "vae": 83.7, "text_encoder": 123.1, "text_encoder_2": 694.7}


def test_parameter_counts_match_sdxl_1_0():
    counts = parameter_counts(build_full_size_pipeline(meta=True))
    assert counts.keys() == PUBLISHED_MILLIONS.keys()
    for component, millions in PUBLISHED_MILLIONS.items():
        assert abs(counts[component] / 1e6 - millions) < 0.1, (component, counts[component])


def test_layer_shapes_match_sdxl_1_0():
    pipe = build_full_size_pipeline(meta=True)
    unet = pipe.unet
    assert unet.config.cross_attention_dim == 2048
    assert unet.add_embedding.linear_1.in_features == 2816  # 6 x 256 time ids + 1280 pooled
    attn = unet.get_submodule("down_blocks.2.attentions.1.transformer_blocks.9.attn2")
    assert (attn.to_k.in_features, attn.to_k.out_features) == (2048, 1280)
    assert pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size == 2048
    assert pipe.text_encoder_2.text_projection.out_features == 1280
    # The byte-level tokenizer's ids index the real 49,408-row embedding tables.
    for encoder, tokenizer in (
        (pipe.text_encoder, pipe.tokenizer),
        (pipe.text_encoder_2, pipe.tokenizer_2),
    ):
        assert encoder.get_input_embeddings().num_embeddings == 49408
        assert len(tokenizer) <= 49408
    assert pipe.vae.config.scaling_factor == 0.13025


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weights_are_made_in_the_asked_dtype(dtype):
    """Built in `dtype` from the start (no float32 copy first), and the default dtype restored."""
    pipe = build_full_size_pipeline(dtype=dtype, meta=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name)
        assert {p.dtype for p in module.parameters()} == {dtype}, name
        assert all(p.is_meta for p in module.parameters()), name
    assert torch.get_default_dtype() == torch.float32

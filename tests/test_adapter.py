"""Adapters are checked against their base before any weight is loaded."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from models.adapter import (
    AdapterError,
    apply_adapters,
    check_fits,
    check_made_for,
    load_adapter_weights,
)
from models.bases import save_base
from models.loading import load_pipeline
from models.tiny import build_tiny_pipeline
from tests.store_helpers import one_layer_adapter

LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def lora(rank: int = 2, fan_in: int = 64, fan_out: int = 64, layer: str = LAYER) -> dict:
    return {
        f"unet.{layer}.lora_A.weight": torch.randn(rank, fan_in) * 0.01,
        f"unet.{layer}.lora_B.weight": torch.randn(fan_out, rank) * 0.01,
    }


@pytest.fixture(scope="module")
def tiny_pipe(tiny_base):
    return load_pipeline("sdxl-tiny")


def test_a_fitting_adapter_passes(tiny_pipe):
    check_fits(lora(), tiny_pipe)


def test_wrong_shapes_are_named(tiny_pipe):
    with pytest.raises(
        AdapterError, match=r"lora_A.weight: shape \(2, 32\) does not fit a layer of 64->64"
    ):
        check_fits(lora(fan_in=32), tiny_pipe)


def test_unknown_layers_and_components_are_named(tiny_pipe):
    with pytest.raises(AdapterError, match="the base has no layer unet.down_blocks.9"):
        check_fits(lora(layer="down_blocks.9.attentions.0.proj"), tiny_pipe)
    with pytest.raises(AdapterError, match="unknown component 'controlnet'"):
        check_fits({"controlnet.x.lora_A.weight": torch.zeros(2, 2)}, tiny_pipe)
    with pytest.raises(AdapterError, match="holds no tensors"):
        check_fits({}, tiny_pipe)


def test_full_size_adapter_does_not_fit_the_tiny_base(tiny_pipe):
    # an SDXL-1.0 layer: 640 wide in the first cross-attention block
    with pytest.raises(AdapterError, match="does not fit"):
        check_fits(lora(rank=8, fan_in=640, fan_out=640), tiny_pipe)


def test_damaged_and_pickled_files_are_refused(tmp_path):
    truncated = tmp_path / "a.safetensors"
    save_file(lora(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_adapter_weights(truncated)
    pickled = tmp_path / "a.bin"
    torch.save(lora(), pickled)
    with pytest.raises(AdapterError, match="must be .safetensors"):
        load_adapter_weights(pickled)
    nan = tmp_path / "nan.safetensors"
    weights = lora()
    weights[next(iter(weights))][0, 0] = float("inf")
    save_file(weights, nan)
    with pytest.raises(AdapterError, match="not finite"):
        load_adapter_weights(nan)


def test_an_adapter_for_another_base_is_refused(tiny_base, tiny_pipe):
    other = save_base(build_tiny_pipeline(seed=1), "sdxl-tiny-other", source="tiny:seed=1")
    entry = one_layer_adapter("for-other", other)
    check_made_for(entry, other)
    with pytest.raises(
        AdapterError, match="was made for base 'sdxl-tiny-other:.*not for sdxl-tiny"
    ):
        check_made_for(entry, tiny_base)
    with pytest.raises(AdapterError, match="was made for base"):
        apply_adapters(tiny_pipe, [(entry, 1.0)], base=tiny_base)
    assert tiny_pipe.get_list_adapters() == {}  # nothing was loaded


def test_fits_a_pipeline_that_already_carries_another_adapter(tiny_pipe):
    tiny_pipe.load_lora_weights(lora(), adapter_name="first")
    try:
        check_fits(lora(), tiny_pipe)  # the layer is now peft's wrapper around the Linear
        with pytest.raises(AdapterError, match="does not fit"):
            check_fits(lora(fan_in=32), tiny_pipe)
    finally:
        tiny_pipe.delete_adapters("first")

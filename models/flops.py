"""FLOPs of SDXL's UNet and VAE, counted by PyTorch's FlopCounterMode: a UNet forward pass and
a VAE decode for inference (the benchmark's TFLOP/s), a LoRA training step for the trainer's
TFLOP/s and MFU.

Counts run on a meta-device copy of the model (shapes only: no memory, no device time, a few
seconds of Python for full-size SDXL, so count once, never per step). The meta device also makes
the count the same everywhere: on a CPU, FlopCounterMode has no formula for PyTorch's CPU flash
attention and would leave attention out; on the meta device attention runs as matrix products,
which it counts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, ModelMixin, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode


def count_flops(call: Callable[[], Any]) -> int:
    """FLOPs of the matrix products and convolutions that `call()` runs (what FlopCounterMode
    counts; elementwise work is left out, as in every MFU figure)."""
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def unet_inputs(
    unet: UNet2DConditionModel,
    *,
    batch: int,
    height: int,
    width: int,
    text_tokens: int = 77,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Random keyword arguments for one UNet call on latents of `height` × `width`.

    Shapes as SDXL's pipeline passes them: text embeddings of both encoders side by side, pooled
    embedding and six size/crop numbers as the added conditioning.
    """
    config = unet.config
    device = unet.device if device is None else device
    dtype = unet.dtype if dtype is None else dtype
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    size = [8.0 * height, 8.0 * width, 0.0, 0.0, 8.0 * height, 8.0 * width]
    kw = {"device": device, "dtype": dtype}
    return {
        "sample": torch.randn(batch, config.in_channels, height, width, **kw),
        "timestep": torch.full((batch,), 500, device=device),
        "encoder_hidden_states": torch.randn(batch, text_tokens, config.cross_attention_dim, **kw),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, pooled, **kw),
            "time_ids": torch.tensor([size] * batch, **kw),
        },
    }


def meta_copy(model: ModelMixin) -> ModelMixin:
    """A shape-only copy of a diffusers model: the same architecture and LoRA layers, on the
    meta device, trainable where `model` is."""
    with torch.device("meta"):
        copy_ = type(model).from_config(model.config)
        copy_.requires_grad_(False)
        for name, lora_config in getattr(model, "peft_config", {}).items():
            copy_.add_adapter(copy.deepcopy(lora_config), adapter_name=name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, param in copy_.named_parameters():
        param.requires_grad_(name in trainable)
    return copy_


@torch.no_grad()
def unet_forward_flops(
    unet: UNet2DConditionModel, *, batch: int, height: int, width: int, text_tokens: int = 77
) -> int:
    """FLOPs of one UNet forward pass on latents of `height` × `width`."""
    model = meta_copy(unet)
    inputs = unet_inputs(
        model, batch=batch, height=height, width=width, text_tokens=text_tokens, device="meta"
    )
    return count_flops(lambda: model(**inputs))


@torch.no_grad()
def vae_decode_flops(vae: AutoencoderKL, *, batch: int, height: int, width: int) -> int:
    """FLOPs of decoding latents of `height` × `width` to an image."""
    model = meta_copy(vae)
    latents = torch.randn(batch, model.config.latent_channels, height, width, device="meta")
    return count_flops(lambda: model.decode(latents.to(model.dtype)))


def unet_training_flops(
    unet: UNet2DConditionModel, *, batch: int, height: int, width: int, text_tokens: int = 77
) -> dict[str, float]:
    """FLOPs of one training micro-batch: the UNet forward and its backward pass, at the
    training shape (latent height and width), counted on a meta copy of `unet`.

    Counted as autograd runs it: with frozen weights and LoRA layers, the backward pass makes
    input gradients everywhere but weight gradients only for the trainable layers, so it costs
    about one forward pass, not the two of full training (a LoRA step is ≈ 2.1 forwards, not 3).
    Recomputation by gradient checkpointing is not counted: these are model FLOPs, as MFU is
    usually quoted.
    """
    model = meta_copy(unet)
    inputs = unet_inputs(
        model,
        batch=batch,
        height=height,
        width=width,
        text_tokens=text_tokens,
        device="meta",
        dtype=torch.float32,
    )
    outputs: list[torch.Tensor] = []
    forward = count_flops(lambda: outputs.append(model(**inputs, return_dict=False)[0]))
    backward = count_flops(lambda: outputs[0].float().square().mean().backward())
    return {
        "forward": float(forward),
        "backward": float(backward),
        "step": float(forward + backward),
    }

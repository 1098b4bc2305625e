"""Adding LoRA layers to the UNet (and optionally the text encoders) and reading them back out."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from train.config import TrainConfig


def lora_configs(config: TrainConfig) -> dict[str, LoraConfig]:
    """The peft LoraConfig of each component that gets LoRA layers."""
    common: dict[str, Any] = {
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "init_lora_weights": "gaussian",
    }
    configs = {"unet": LoraConfig(target_modules=list(config.target_modules), **common)}
    if config.text_encoder_lora:
        te = LoraConfig(target_modules=list(config.text_encoder_target_modules), **common)
        configs["text_encoder"] = te
        configs["text_encoder_2"] = te
    return configs


def add_lora(pipe: StableDiffusionXLPipeline, config: TrainConfig) -> dict[str, LoraConfig]:
    """Freeze the pipeline and add LoRA layers (float32) to the configured components.

    The new layers start as an identity update (B = 0), so step 0 reproduces the base.
    """
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    configs = lora_configs(config)
    for component, lora_config in configs.items():
        module = getattr(pipe, component)
        missing = [t for t in lora_config.target_modules if not _has_layer(module, t)]
        if missing:
            raise ValueError(
                f"target_modules: {component} has no layers named {', '.join(sorted(missing))}"
            )
        module.add_adapter(lora_config)
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return configs


def _has_layer(module: torch.nn.Module, target: str) -> bool:
    return any(name == target or name.endswith("." + target) for name, _ in module.named_modules())


def trainable_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The trainable tensors by `component.parameter_name`, what a checkpoint must keep."""
    return {
        f"{component}.{name}": param.detach().cpu().clone()
        for component, module in modules.items()
        for name, param in module.named_parameters()
        if param.requires_grad
    }


def load_trainable_state(
    modules: dict[str, torch.nn.Module], state: dict[str, torch.Tensor]
) -> None:
    """Copy checkpointed tensors back into the LoRA layers, refusing any mismatch."""
    expected = {
        f"{component}.{name}": param
        for component, module in modules.items()
        for name, param in module.named_parameters()
        if param.requires_grad
    }
    if set(expected) != set(state):
        missing = sorted(set(expected) - set(state))[:3]
        extra = sorted(set(state) - set(expected))[:3]
        raise ValueError(
            f"checkpoint does not match this run's LoRA layers (missing {missing}, extra {extra})"
        )
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(state[key].to(param.device, param.dtype))


def diffusers_layers(modules: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """LoRA weights per component, in peft's `lora_A`/`lora_B` naming, which diffusers reads.

    (diffusers' `convert_state_dict_to_diffusers` would rename attention layers to the old
    `lora.down`/`lora.up` form but leave convolutions alone; a file mixing both loads wrongly.)
    """
    return {
        component: {
            k: v.detach().float().cpu().contiguous()
            for k, v in get_peft_model_state_dict(module).items()
        }
        for component, module in modules.items()
    }


# --- LoRA dropout that does not depend on the batch an example is in


class SampleSeeds:
    """The dropout seed of each example in the micro-batch being trained, in batch order.

    The training loop sets it before each micro-batch; every `SeededDropout` layer reads it.
    """

    def __init__(self) -> None:
        self.seeds: tuple[int, ...] = ()
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]


LAYER_STRIDE = 0x9E3779B97F4A7C15
"""Spreads one example's seed over the layers: layer i draws from seed + i × this (mod 2⁶³)."""


class SeededDropout(torch.nn.Dropout):
    """LoRA dropout whose mask for an example depends on that example's seed and the layer only.

    peft's `nn.Dropout` draws one mask for the whole batch from the global generator, so an
    example's mask depends on which examples share its micro-batch and process: two processes of
    batch 2 would not train as one of batch 4. Here example k's mask comes from a generator seeded
    by `seeds.seeds[k]` and the layer's index, so it is the same in any split of the global batch,
    and again when gradient checkpointing recomputes the layer.
    """

    def __init__(self, p: float, seeds: SampleSeeds, layer: int):
        super().__init__(p)
        self.sample_seeds = seeds
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        seeds = self.sample_seeds.seeds
        if len(seeds) != x.shape[0]:
            raise RuntimeError(
                f"LoRA dropout has {len(seeds)} example seeds for a batch of {x.shape[0]}; the "
                "training loop sets them before each micro-batch"
            )
        generator = self.sample_seeds.generator(x.device)
        keep = []
        for seed in seeds:
            generator.manual_seed((seed + self.layer * LAYER_STRIDE) % 2**63)
            keep.append(torch.rand(x.shape[1:], generator=generator, device=x.device) >= self.p)
        return x * (torch.stack(keep).to(x.dtype) / (1 - self.p))


def seed_dropout(modules: dict[str, torch.nn.Module]) -> SampleSeeds:
    """Replace peft's LoRA dropout layers in `modules` by `SeededDropout` layers reading one
    `SampleSeeds`, which is returned (with dropout 0 peft makes none, and nothing changes)."""
    seeds = SampleSeeds()
    layer = 0
    for module in modules.values():
        for sub in module.modules():
            dropouts = getattr(sub, "lora_dropout", None)
            if not isinstance(dropouts, torch.nn.ModuleDict):
                continue
            for name, dropout in dropouts.items():
                if isinstance(dropout, torch.nn.Dropout):
                    dropouts[name] = SeededDropout(dropout.p, seeds, layer)
                    layer += 1
    return seeds

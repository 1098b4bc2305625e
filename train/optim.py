"""Optimizer and learning-rate schedule from the config."""

from __future__ import annotations

import importlib.util
import logging

import torch
from diffusers.optimization import get_scheduler

from train.config import TrainConfig

log = logging.getLogger(__name__)


def make_optimizer(
    config: TrainConfig, params: list[torch.nn.Parameter], device: torch.device
) -> torch.optim.Optimizer:
    """AdamW: 8-bit (bitsandbytes) when asked or, for `auto`, when it is installed and on CUDA."""
    kind = config.optimizer
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if kind == "auto":
        kind = "adamw8bit" if has_bnb and device.type == "cuda" else "adamw"
    kwargs = {
        "lr": config.learning_rate,
        "betas": (config.adam_beta1, config.adam_beta2),
        "weight_decay": config.weight_decay,
        "eps": config.adam_epsilon,
    }
    if kind == "adamw8bit":
        if not has_bnb:
            raise ValueError("optimizer: adamw8bit needs bitsandbytes (pip install bentolora[gpu])")
        import bitsandbytes as bnb

        log.info("optimizer: 8-bit AdamW (bitsandbytes)")
        return bnb.optim.AdamW8bit(params, **kwargs)
    # The fused kernel is one launch for all LoRA tensors instead of several per tensor.
    return torch.optim.AdamW(params, fused=device.type == "cuda", **kwargs)


def make_lr_schedule(
    config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=total_steps,
    )

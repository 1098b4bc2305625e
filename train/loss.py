"""The diffusion training loss: noise a batch's latents, ask the UNet for the noise (epsilon) or
the velocity (v-prediction), and score it with min-SNR-γ weights; offset noise optional.

`denoising_loss` is the whole objective, shared by the training step and the fixed-noise
validation loss; the functions below it are its parts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import SchedulerMixin, StableDiffusionXLPipeline

from train.batches import Batch, encode_captions


def denoising_loss(
    pipe: StableDiffusionXLPipeline,
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    batch: Batch,
    *,
    generators: Sequence[torch.Generator],
    prediction_type: str,
    snr_gamma: float,
    noise_offset: float,
    device: torch.device,
    dtype: torch.dtype,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Noise the batch's latents at random (or given) timesteps and score the UNet's prediction.

    All randomness comes from `generators`, one per example, drawn on the CPU: example i's noise
    and timestep depend on its own generator alone, so the same generator states give the same
    loss on any device, after any resume, and however the examples are split into micro-batches
    and processes.
    """
    latents = batch.latents
    if len(generators) != latents.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {latents.shape[0]}")
    one = torch.Size((1, *latents.shape[1:]))
    noise = torch.cat([make_noise(one, g, noise_offset) for g in generators])
    if timesteps is None:
        steps = scheduler.config.num_train_timesteps
        timesteps = torch.cat([torch.randint(0, steps, (1,), generator=g) for g in generators])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = target_for(scheduler, latents, noise, timesteps, prediction_type)
    if batch.prompt_embeds is not None:
        prompt_embeds, pooled = batch.prompt_embeds, batch.pooled
    else:
        prompt_embeds, pooled = encode_captions(pipe, batch.captions, device)
    model_pred = unet(
        noisy.to(device, dtype),
        timesteps.to(device),
        encoder_hidden_states=prompt_embeds.to(device, dtype),
        added_cond_kwargs={
            "text_embeds": pooled.to(device, dtype),
            "time_ids": batch.time_ids.to(device, dtype),
        },
        return_dict=False,
    )[0]
    weights = loss_weights(scheduler, timesteps, snr_gamma, prediction_type).to(device)
    return diffusion_loss(model_pred, target.to(device), weights)


def make_noise(shape: torch.Size, generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise drawn on the CPU from `generator` (same numbers on any device), with offset noise.

    Offset noise adds a per-channel constant so the model can learn very dark or bright images.
    """
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


def target_for(
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """What the UNet should output: the noise (epsilon) or the velocity (v-prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {prediction_type!r} is not epsilon or v_prediction")


def snr(scheduler: SchedulerMixin, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1 - alphas_cumprod)


def loss_weights(
    scheduler: SchedulerMixin, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Per-sample weights of min-SNR-γ (Hang et al. 2023): min(SNR, γ) / SNR, or / (SNR + 1) for v."""
    if not gamma:
        return torch.ones(timesteps.shape, device=timesteps.device)
    ratio = snr(scheduler, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    return clipped / (ratio + 1) if prediction_type == "v_prediction" else clipped / ratio


def diffusion_loss(
    model_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted mean squared error, computed in float32."""
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
    return (per_sample * weights).mean()

"""The diffusion training loss: targets for epsilon and v-prediction, min-SNR-γ, offset noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import SchedulerMixin


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

"""One forward pass of the training objective, shared by the training step and the validation loss."""

from __future__ import annotations

import torch
from diffusers import SchedulerMixin, StableDiffusionXLPipeline

from train.encode import encode_captions
from train.features import Batch
from train.loss import diffusion_loss, loss_weights, make_noise, target_for


def denoising_loss(
    pipe: StableDiffusionXLPipeline,
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    batch: Batch,
    *,
    generator: torch.Generator,
    prediction_type: str,
    snr_gamma: float,
    noise_offset: float,
    device: torch.device,
    dtype: torch.dtype,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Noise the batch's latents at random (or given) timesteps and score the UNet's prediction.

    All randomness comes from `generator`, drawn on the CPU, so the same generator state gives
    the same loss on any device and after any resume.
    """
    latents = batch.latents
    noise = make_noise(latents.shape, generator, noise_offset)
    if timesteps is None:
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
        )
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

"""Turning images and captions into what the UNet consumes: latents, text embeddings, time ids."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline


@torch.no_grad()
def encode_images(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE posterior's parameters (mean and log-variance, 2×4 channels) of images in [-1, 1].

    Keeping the distribution rather than one sample lets every epoch draw a fresh latent.
    """
    pixels = pixels.to(vae.device, vae.dtype)
    return vae.encode(pixels).latent_dist.parameters.float().cpu()


def sample_latents(
    params: torch.Tensor, generator: torch.Generator, scaling_factor: float
) -> torch.Tensor:
    """Draw latents from cached posterior parameters, scaled as the UNet expects."""
    mean, logvar = params.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    noise = torch.randn(mean.shape, generator=generator)
    return (mean + std * noise) * scaling_factor


def encode_captions(
    pipe: StableDiffusionXLPipeline, captions: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings (penultimate layers of both encoders) and pooled embeddings, as at inference.

    Uses the pipeline's own `encode_prompt`, so training sees exactly what generation will.
    Gradients flow when the text encoders are being trained.
    """
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    return prompt_embeds, pooled

"""What a run is judged by while it trains: a loss on fixed noise, and images from fixed seeds."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import SchedulerMixin, StableDiffusionXLPipeline

from train.features import Batch
from train.step import denoising_loss

log = logging.getLogger(__name__)

VALIDATION_SEED = 1234
FIXED_TIMESTEPS = (100, 300, 500, 700, 900)
"""The fixed-noise loss averages these timesteps, so a change in it is the model's, not chance's."""


@torch.no_grad()
def fixed_noise_loss(
    pipe: StableDiffusionXLPipeline,
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    batches: Sequence[Batch],
    *,
    prediction_type: str,
    device: torch.device,
    dtype: torch.dtype,
) -> float:
    """Mean denoising loss over `batches` at fixed timesteps with fixed noise (no min-SNR weights)."""
    total, count = 0.0, 0
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    for batch in batches:
        for t in FIXED_TIMESTEPS:
            timesteps = torch.full((batch.latents.shape[0],), t, dtype=torch.long)
            loss = denoising_loss(
                pipe,
                unet,
                scheduler,
                batch,
                generator=generator,
                prediction_type=prediction_type,
                snr_gamma=0.0,
                noise_offset=0.0,
                device=device,
                dtype=dtype,
                timesteps=timesteps,
            )
            total += float(loss)
            count += 1
    return total / max(count, 1)


@torch.no_grad()
def render_images(
    pipe: StableDiffusionXLPipeline,
    prompts: Sequence[str],
    out_dir: Path,
    *,
    size: int,
    steps: int,
    guidance: float,
    device: torch.device,
) -> list[Path]:
    """Render each prompt with its own fixed seed into `out_dir`; the same seeds every validation."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(VALIDATION_SEED + i)
        image = pipe(
            prompt,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
        ).images[0]
        path = out_dir / f"{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths

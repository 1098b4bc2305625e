"""Per-example model inputs for a micro-batch, read from the cache or computed on the fly."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from tqdm.auto import tqdm

from train.cache import ExampleCache
from train.config import TrainConfig
from train.dataset import Example
from train.encode import encode_captions, encode_images, sample_latents
from train.preprocess import Bucket, prepare_image

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """UNet inputs for one micro-batch, on the CPU."""

    latents: torch.Tensor
    time_ids: torch.Tensor
    prompt_embeds: torch.Tensor | None
    """None when the text encoders run in the training step (text-encoder LoRA)."""
    pooled: torch.Tensor | None
    captions: list[str]


class Features:
    """Turns example indices into a `Batch`, using cached encodings where the config allows."""

    def __init__(
        self,
        pipe: StableDiffusionXLPipeline,
        examples: Sequence[Example],
        buckets: Sequence[Bucket],
        config: TrainConfig,
        cache: ExampleCache | None,
    ):
        self.pipe = pipe
        self.examples = examples
        self.buckets = buckets
        self.config = config
        self.cache = cache

    def _prepare(self, index: int, flip: bool, rng: random.Random | None):
        with Image.open(self.examples[index].path) as image:
            return prepare_image(
                image, self.buckets[index], crop=self.config.crop, flip=flip, rng=rng
            )

    def _encode_example(self, index: int, device: torch.device) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        if self.config.cache_latents:
            variants = (False, True) if self.config.flip else (False,)
            for flip in variants:
                prepared = self._prepare(index, flip, None)
                suffix = "_flipped" if flip else ""
                tensors["latent" + suffix] = encode_images(self.pipe.vae, prepared.pixels[None])[0]
                tensors["time_ids" + suffix] = torch.tensor(prepared.time_ids, dtype=torch.float32)
        if self.config.cache_text_embeddings:
            with torch.no_grad():
                embeds, pooled = encode_captions(self.pipe, [self.examples[index].caption], device)
            tensors["prompt_embeds"] = embeds[0].float().cpu()
            tensors["pooled"] = pooled[0].float().cpu()
        return tensors

    def fill_cache(self, device: torch.device, show_progress: bool = True) -> int:
        """Encode every example missing from the cache; returns how many were encoded."""
        if self.cache is None:
            return 0
        missing = [i for i in range(len(self.examples)) if self.cache.read(i) is None]
        for index in tqdm(missing, desc="caching latents/embeddings", disable=not show_progress):
            self.cache.write(index, self._encode_example(index, device))
        if missing:
            log.info(
                "cached %d of %d examples in %s",
                len(missing),
                len(self.examples),
                self.cache.folder,
            )
        return len(missing)

    def batch(
        self, indices: Sequence[int], generator: torch.Generator, rng: random.Random
    ) -> Batch:
        """Assemble one micro-batch; `generator` and `rng` make latent sampling, flips and crops repeatable."""
        latents, time_ids, embeds, pooled = [], [], [], []
        for index in indices:
            flip = self.config.flip and rng.random() < 0.5
            cached = self.cache.read(index) if self.cache is not None else None
            suffix = "_flipped" if flip else ""
            if self.config.cache_latents:
                params = cached["latent" + suffix][None]
                time_ids.append(cached["time_ids" + suffix])
            else:
                prepared = self._prepare(index, flip, rng)
                params = encode_images(self.pipe.vae, prepared.pixels[None])
                time_ids.append(torch.tensor(prepared.time_ids, dtype=torch.float32))
            latents.append(
                sample_latents(params, generator, self.pipe.vae.config.scaling_factor)[0]
            )
            if self.config.cache_text_embeddings:
                embeds.append(cached["prompt_embeds"])
                pooled.append(cached["pooled"])
        return Batch(
            latents=torch.stack(latents),
            time_ids=torch.stack(time_ids),
            prompt_embeds=torch.stack(embeds) if embeds else None,
            pooled=torch.stack(pooled) if pooled else None,
            captions=[self.examples[i].caption for i in indices],
        )

"""Examples -> cached latents and caption embeddings -> micro-batches: what the UNet consumes.

One example's way on from `train.data`: `Batches.fill_cache` encodes each prepared image with the
VAE (the posterior's mean and log-variance, so every epoch can draw a fresh latent) and each caption
with both text encoders, once, into an `ExampleCache` on disk; `BatchSchedule` says which examples
form micro-batch k; `Batches.batch` reads them back (or, for what the config does not cache,
prepares and encodes them on the fly), samples the latents and stacks a `Batch`.

The cache folder's name is a hash of everything the tensors depend on (base weights, dataset
bytes and captions, buckets and preprocessing settings), so a changed base or dataset never reads
stale entries, and a second run on the same data skips the encoders entirely.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from models.store import StoreEntry
from train.config import TrainConfig
from train.data import Bucket, DatasetScan, Example, prepare_image

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


class BatchSchedule:
    """Which examples go in micro-batch k: a pure function of the seed and k, over endless epochs.

    Batches hold examples of one bucket (one image size); each epoch is a fresh shuffle. Because
    batch k is computed from (seed, k) alone, a resumed run sees exactly the batches an
    uninterrupted run would, and each data-parallel process takes its own share without a
    sampler's hidden state.
    """

    def __init__(self, bucket_of: Sequence[Hashable], batch_size: int, seed: int):
        self.bucket_of = list(bucket_of)
        self.batch_size = batch_size
        self.seed = seed
        self._epochs: dict[int, list[list[int]]] = {}
        sizes: dict[Hashable, int] = defaultdict(int)
        for bucket in self.bucket_of:
            sizes[bucket] += 1
        # The same every epoch: each bucket's size is fixed, only the order changes.
        self.batches_per_epoch = sum(-(-n // batch_size) for n in sizes.values())

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch`: shuffled, grouped by bucket, the batch order shuffled again."""
        if epoch not in self._epochs:
            rng = random.Random(f"{self.seed}/epoch/{epoch}")
            order = list(range(len(self.bucket_of)))
            rng.shuffle(order)
            groups: dict[Hashable, list[int]] = defaultdict(list)
            for index in order:
                groups[self.bucket_of[index]].append(index)
            batches = [
                members[i : i + self.batch_size]
                for members in groups.values()
                for i in range(0, len(members), self.batch_size)
            ]
            rng.shuffle(batches)
            self._epochs = {epoch: batches}  # keep one epoch: memory stays flat on long runs
        return self._epochs[epoch]

    def batch(self, index: int) -> tuple[int, list[int]]:
        """(epoch, example indices) of global micro-batch `index`."""
        epoch, position = divmod(index, self.batches_per_epoch)
        return epoch, self.epoch_batches(epoch)[position]


class Batches:
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


# --- the encoders


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


# --- the disk cache


def open_cache(
    config: TrainConfig,
    base: StoreEntry,
    scan: DatasetScan,
    buckets: Sequence[Bucket],
    text_dtype: torch.dtype,
) -> ExampleCache | None:
    """The cache of this base, data and preprocessing, or None when the config caches nothing."""
    if not (config.cache_latents or config.cache_text_embeddings):
        return None
    settings = {
        "base_hash": base.metadata["content_hash"],
        "data": scan.fingerprint(),
        "buckets": [(b.width, b.height) for b in buckets],
        "crop": config.crop,
        "flip": config.flip,
        "latents": config.cache_latents,
        "text": config.cache_text_embeddings,
        "text_dtype": str(text_dtype),
    }
    return ExampleCache(config.cache_dir, cache_key(**settings), settings)


def cache_key(**parts: Any) -> str:
    """A short stable hash of JSON-serializable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


class ExampleCache:
    """One safetensors file per example under `root/key/`; writes are atomic renames."""

    def __init__(self, root: str | Path, key: str, describe: dict[str, Any]):
        self.folder = Path(root) / key
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = self.folder / "manifest.json"
        if not manifest.exists():
            tmp = manifest.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(describe, indent=2, sort_keys=True))
            os.replace(tmp, manifest)

    def path(self, index: int) -> Path:
        return self.folder / f"{index:07d}.safetensors"

    def read(self, index: int) -> dict[str, torch.Tensor] | None:
        """The tensors of example `index`, or None when absent or unreadable (then rebuilt)."""
        path = self.path(index)
        if not path.exists():
            return None
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError):
            return None

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path(index)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)

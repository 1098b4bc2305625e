"""Examples -> cached latents and caption embeddings -> micro-batches: what the UNet consumes.

One example's way on from `train.data`: `Batches.fill_cache` encodes each prepared image with the
VAE (the posterior's mean and log-variance, so every epoch can draw a fresh latent) and each caption
with both text encoders, once, into an `ExampleCache` on disk; `BatchSchedule` says which
examples form the global batch of optimizer step s; `Batches.batch` reads a micro-batch's share
back (or, for what the config does not cache, prepares and encodes it on the fly), samples the
latents and stacks a `Batch`.

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
    """Which examples make up the global batch of optimizer step s: a pure function of the seed
    and s, over endless epochs.

    A global batch is `size` examples (batch_size × gradient_accumulation_steps × processes) of
    one bucket (one image size); the micro-batches of every process are slices of it. Each bucket
    draws its examples from its own endless stream of shuffled epochs, so every example of a
    bucket is seen once before any is seen again, and a global batch may run across the end of
    an epoch (or, for a bucket smaller than the global batch, hold an example more than once).
    Which bucket each step takes is shuffled per round (a round gives each bucket the batches one
    epoch of it fills). Because step s's examples are computed from (seed, s) alone, a resumed run
    takes exactly the batches an uninterrupted one would, and any split of the global batch into
    processes and micro-batches trains on the same examples.
    """

    def __init__(self, bucket_of: Sequence[Hashable], size: int, seed: int):
        if size < 1:
            raise ValueError(f"global batch size must be at least 1, got {size}")
        self.size = size
        self.seed = seed
        members: dict[Hashable, list[int]] = {}
        for index, bucket in enumerate(bucket_of):
            members.setdefault(bucket, []).append(index)
        self.members = list(members.values())
        """Each bucket's example indices, buckets in order of first appearance."""
        self.per_round = [-(-len(m) // size) for m in self.members]
        self.round_length = sum(self.per_round)
        self._orders: dict[tuple[int, int], list[int]] = {}

    def batch(self, step: int) -> tuple[int, list[int]]:
        """(epoch of its bucket at the batch's first example, example indices) of step `step`."""
        round_, position = divmod(step, self.round_length)
        sequence = self._round(round_)
        bucket = sequence[position]
        taken = round_ * self.per_round[bucket] + sequence[:position].count(bucket)
        first = taken * self.size
        examples = [self._stream(bucket, first + k) for k in range(self.size)]
        return first // len(self.members[bucket]), examples

    def _round(self, round_: int) -> list[int]:
        sequence = [b for b, n in enumerate(self.per_round) for _ in range(n)]
        random.Random(f"{self.seed}/round/{round_}").shuffle(sequence)
        return sequence

    def _stream(self, bucket: int, position: int) -> int:
        """Example `position` of the bucket's stream: its members in a fresh order each epoch."""
        members = self.members[bucket]
        epoch, offset = divmod(position, len(members))
        key = (bucket, epoch)
        if key not in self._orders:
            order = list(members)
            random.Random(f"{self.seed}/bucket/{bucket}/epoch/{epoch}").shuffle(order)
            if len(self._orders) > 2 * len(self.members):  # memory stays flat on long runs
                self._orders.clear()
            self._orders[key] = order
        return self._orders[key][offset]


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
        self,
        indices: Sequence[int],
        generators: Sequence[torch.Generator],
        rngs: Sequence[random.Random],
    ) -> Batch:
        """Assemble one micro-batch; example k's latent sample comes from `generators[k]` and its
        flip and crop from `rngs[k]`, so each example is the same in any micro-batch."""
        latents, time_ids, embeds, pooled = [], [], [], []
        for index, generator, rng in zip(indices, generators, rngs, strict=True):
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
        "orientation": "exif",  # images are turned upright before encoding (since EXIF support)
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

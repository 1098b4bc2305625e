"""The work behind the endpoints: one pipeline call per group of compatible requests, CLIP scores.

Requests in a batch are grouped by everything the pipeline takes as one value (size, steps,
guidance, scheduler, adapter set); each image has its own generator seeded from its request, so
an image does not depend on what it was batched with.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Sequence

import torch

from models.adapter import list_adapters
from models.bases import get_base
from models.clip import ClipScorer
from models.loading import load_pipeline
from service.adapter_cache import AdapterCache
from service.images import encode
from service.registry import SERVED
from service.schedulers import make_scheduler
from service.schemas import (
    MAX_SEED,
    AdapterUsed,
    GeneratedImage,
    GenerateRequest,
    GenerateResponse,
    ScoreRequest,
    ScoreResponse,
)
from service.settings import Settings

log = logging.getLogger(__name__)


def group_key(request: GenerateRequest) -> tuple:
    return (
        request.width,
        request.height,
        request.steps,
        request.guidance,
        request.scheduler,
        tuple((a.name, a.scale) for a in request.adapters),
        # An empty negative prompt means zeroed negative embeddings in SDXL (as diffusers does
        # for None), which a batch can only express for all its members at once.
        bool(request.negative_prompt),
    )


class Engine:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = settings.torch_device()
        self.base = get_base(settings.base)
        self.pipe = load_pipeline(
            f"store:{self.base.tag}", dtype=settings.torch_dtype(), device=self.device
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler_config = dict(self.pipe.scheduler.config)
        self.adapters = AdapterCache(self.pipe, self.base)
        self.scorer = ClipScorer.from_store(settings.clip, device=self.device)
        self._lock = threading.Lock()  # one pipeline, one batch at a time
        self.refresh_adapters()
        SERVED.settings = settings
        SERVED.base_tag = self.base.tag
        SERVED.tokenizers = (self.pipe.tokenizer, self.pipe.tokenizer_2)
        SERVED.ready = True
        log.info(
            "serving %s with %d adapters on %s", self.base.tag, len(SERVED.adapters), self.device
        )

    def refresh_adapters(self) -> None:
        """Read the store: the newest version of each adapter made for this base."""
        served, foreign = {}, {}
        for entry in list_adapters():  # newest first
            name = entry.name.removeprefix("lora-")
            if entry.metadata.get("base_hash") == self.base.metadata["content_hash"]:
                served.setdefault(name, entry)
            else:
                foreign.setdefault(name, entry.metadata.get("base_tag", "?"))
        SERVED.adapters = served
        SERVED.foreign_adapters = {k: v for k, v in foreign.items() if k not in served}

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResponse]:
        seeds = [r.seed if r.seed is not None else secrets.randbelow(MAX_SEED) for r in requests]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[group_key(request)].append(index)
        results: list[list[GeneratedImage]] = [[] for _ in requests]
        for indices in groups.values():
            jobs = [(i, k) for i in indices for k in range(requests[i].num_images)]
            step = self.settings.max_batch_images
            for start in range(0, len(jobs), step):
                chunk = jobs[start : start + step]
                for (i, _), image in zip(
                    chunk, self._run(requests, seeds, chunk, len(requests)), strict=True
                ):
                    results[i].append(image)
        return [GenerateResponse(images=images) for images in results]

    def _run(self, requests, seeds, chunk, batch_requests: int) -> list[GeneratedImage]:
        first = requests[chunk[0][0]]
        image_seeds = [(seeds[i] + k) % (MAX_SEED + 1) for i, k in chunk]
        choices = [(SERVED.adapters[a.name], a.scale) for a in first.adapters]
        with self._lock:
            started = time.perf_counter()
            self.adapters.activate(choices)
            self.pipe.scheduler = make_scheduler(first.scheduler, self.scheduler_config)
            images = self.pipe(
                prompt=[requests[i].prompt for i, _ in chunk],
                negative_prompt=[requests[i].negative_prompt for i, _ in chunk]
                if first.negative_prompt
                else None,
                width=first.width,
                height=first.height,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance,
                generator=[torch.Generator("cpu").manual_seed(s) for s in image_seeds],
            ).images
            compute = time.perf_counter() - started
        used = [
            AdapterUsed(name=e.name.removeprefix("lora-"), version=e.version, scale=s)
            for e, s in choices
        ]
        out = []
        for (i, _), image, seed in zip(chunk, images, image_seeds, strict=True):
            request = requests[i]
            t0 = time.perf_counter()
            data = encode(image, request.output_format)
            settings = request.model_dump(exclude={"adapters"}) | {
                "seed": seed,
                "base": self.base.tag,
            }
            out.append(
                GeneratedImage(
                    image=data,
                    format=request.output_format,
                    seed=seed,
                    adapters=used,
                    settings=settings,
                    timings={
                        "pipeline_s": round(compute, 4),
                        "encode_s": round(time.perf_counter() - t0, 4),
                        "batch_images": len(chunk),
                        "batch_requests": batch_requests,
                    },
                )
            )
        return out

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResponse]:
        """All images of all requests through CLIP together, then split per request."""
        images = [image for r in requests for image in r._decoded]
        texts = [text for r in requests for text in r.texts]
        with self._lock:
            image_emb = self.scorer.image_embeddings(images)
            text_emb = self.scorer.text_embeddings(texts) if texts else None
        out, i0, t0 = [], 0, 0
        for request in requests:
            emb = image_emb[i0 : i0 + len(request.images)]
            scores = (
                100.0 * (emb @ text_emb[t0 : t0 + len(request.texts)].T).clamp(min=0)
                if request.texts
                else torch.zeros(len(request.images), 0)
            )
            out.append(
                ScoreResponse(clip_scores=scores.tolist(), image_similarity=(emb @ emb.T).tolist())
            )
            i0 += len(request.images)
            t0 += len(request.texts)
        return out

"""The work behind the endpoints: one pipeline call per group of compatible requests, CLIP scores.

Requests in a batch are grouped by everything the pipeline takes as one value (size, steps,
guidance, scheduler, adapter set); each image has its own generator seeded from its request, so
an image does not depend on what it was batched with.
"""

from __future__ import annotations

import gc
import logging
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from bentoml.exceptions import ServiceUnavailable

from models import failpoints
from models.adapter import AdapterError, list_adapters, verify_adapter, weights_path
from models.bases import get_base
from models.clip import ClipScorer
from models.loading import load_pipeline
from models.lora_fusion import check_mergeable
from models.pipeline_speed import speed_up
from models.stages import is_production
from service import metrics
from service.adapter_cache import AdapterCache
from service.encoder import Encoded, Encoder
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
        speed = settings.speed_options()
        speed_up(self.pipe, speed, self.device)  # before any adapter is merged
        self.adapters = AdapterCache(
            self.pipe, self.base, mode=settings.lora_mode, device=self.device
        )
        self.scorer = ClipScorer.from_store(settings.clip, device=self.device)
        self.encoder = Encoder(settings.encode_workers)
        self.encoder.start()
        self._lock = threading.Lock()  # one pipeline, one batch at a time
        self.refresh_adapters()
        SERVED.reload_adapters = self.reload_adapters
        SERVED.settings = settings
        SERVED.base_tag = self.base.tag
        SERVED.default_size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        if settings.warmup:
            self.warm_up(SERVED.default_size)
        # Own instances: request validation tokenizes on the event loop while a batch tokenizes
        # in the pipeline; a fast tokenizer shared across threads switches padding/truncation
        # under the other caller (seen under load as "expected sequence of length 13 (got 12)").
        # Loaded afresh, since a deepcopy loses the decoder that error messages use.
        SERVED.tokenizers = tuple(
            type(t).from_pretrained(self.base.path / folder)
            for t, folder in (
                (self.pipe.tokenizer, "tokenizer"),
                (self.pipe.tokenizer_2, "tokenizer_2"),
            )
        )
        SERVED.ready = True
        log.info(
            "serving %s with %d adapters on %s (LoRA %s; speed-ups: %s)",
            self.base.tag,
            len(SERVED.adapters),
            self.device,
            settings.lora_mode,
            speed.describe(),
        )

    def warm_up(self, size: int, steps: int = 2) -> None:
        """Run the pipeline once per batch size served at `size` (1 and the largest): compiles
        and allocates before the first request. The UNet runs the same shapes at any step
        count, so two steps are enough."""
        for n in sorted({1, self.settings.max_batch_images}):
            started = time.perf_counter()
            with self._lock:
                self.pipe(
                    prompt=["warm-up"] * n,
                    width=size,
                    height=size,
                    num_inference_steps=steps,
                    guidance_scale=5.0,
                    generator=torch.Generator("cpu").manual_seed(0),
                )
            log.info(
                "warm-up: %d images of %d px in %.1f s", n, size, time.perf_counter() - started
            )

    def refresh_adapters(self) -> None:
        """Read the store: per adapter name, the newest version made for this base that passes
        every check (verify_adapter); versions that fail are listed as refused, with why.
        With BENTOLORA_PROMOTED_ONLY only versions labelled stage=production count; a name with
        no such version is refused as not promoted."""
        served, foreign, refused = {}, {}, {}
        entries = list_adapters()  # newest first
        promoted = {e.name.removeprefix("lora-") for e in entries if is_production(e)}
        for entry in entries:
            name = entry.name.removeprefix("lora-")
            if name in served:
                continue
            if entry.metadata.get("base_hash") != self.base.metadata["content_hash"]:
                foreign.setdefault(name, entry.metadata.get("base_tag", "?"))
                continue
            if self.settings.promoted_only and not is_production(entry):
                if name not in promoted:
                    refused.setdefault(name, "not promoted (BENTOLORA_PROMOTED_ONLY)")
                continue
            try:
                verify_adapter(
                    entry, self.pipe, self.base, max_bytes=self.settings.max_adapter_bytes
                )
                if self.settings.lora_mode == "fused":
                    check_mergeable(weights_path(entry), tag=entry.tag)
            except AdapterError as err:
                log.warning("refusing adapter %s: %s", entry.tag, err)
                refused.setdefault(name, str(err))
                continue
            served[name] = entry
        SERVED.adapters = served
        SERVED.refused_adapters = {k: v for k, v in refused.items() if k not in served}
        SERVED.foreign_adapters = {
            k: v for k, v in foreign.items() if k not in served and k not in refused
        }

    def reload_adapters(self) -> None:
        with self._lock:
            self.refresh_adapters()

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResponse]:
        if not requests:
            return []
        seeds = [r.seed if r.seed is not None else secrets.randbelow(MAX_SEED) for r in requests]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[group_key(request)].append(index)
        results: list[list[Pending]] = [[] for _ in requests]
        started = time.perf_counter()
        for indices in groups.values():
            jobs = [(i, k) for i in indices for k in range(requests[i].num_images)]
            step = self.settings.max_batch_images
            for start in range(0, len(jobs), step):
                chunk = self._live(requests, jobs[start : start + step])
                if not chunk:
                    continue
                for (i, _), image in zip(
                    chunk, self._run_fitting(requests, seeds, chunk, len(requests)), strict=True
                ):
                    results[i].append(image)
        # Encoding ran beside the later groups' pipeline calls; collected last.
        responses = [GenerateResponse(images=[p.finish() for p in images]) for images in results]
        SERVED.record_batch("/generate", time.perf_counter() - started, len(requests))
        return responses

    def _live(self, requests, chunk: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The jobs whose request is still within its deadline. A request past it has already
        been answered 504 by the server's timeout, so computing it would only delay the rest."""
        deadline = self.settings.request_timeout_s
        now = time.monotonic()
        late = {i for i, _ in chunk if now - requests[i]._received > deadline}
        if late:
            metrics.dropped(len(late))
            log.warning("dropping %d requests past their %d s deadline", len(late), deadline)
        return [(i, k) for i, k in chunk if i not in late]

    def _run_fitting(self, requests, seeds, chunk, batch_requests: int) -> list[Pending]:
        """`_run`, halving the batch when the GPU runs out of memory; a single image that does
        not fit is answered 503. An unrecoverable device error marks the server broken (then
        /livez fails and the orchestrator restarts it)."""
        try:
            return self._run(requests, seeds, chunk, batch_requests)
        except torch.OutOfMemoryError:
            metrics.oom()
            free_device_memory(self.device)
            if len(chunk) == 1:
                first = requests[chunk[0][0]]
                raise ServiceUnavailable(
                    SERVED.mark_unavailable(
                        f"out of GPU memory for one {first.width}x{first.height} image; "
                        "try fewer pixels or retry when the server is less busy"
                    )
                ) from None
            half = len(chunk) // 2
            log.warning(
                "out of memory on %d images; retrying as %d + %d",
                len(chunk),
                half,
                len(chunk) - half,
            )
            return self._run_fitting(
                requests, seeds, chunk[:half], batch_requests
            ) + self._run_fitting(requests, seeds, chunk[half:], batch_requests)
        except torch.AcceleratorError as err:
            SERVED.broken = str(err).splitlines()[0]
            log.critical("device failed, the server must restart: %s", err)
            raise ServiceUnavailable(
                SERVED.mark_unavailable(f"the GPU failed ({SERVED.broken}); restarting")
            ) from None

    def _run(self, requests, seeds, chunk, batch_requests: int) -> list[Pending]:
        first = requests[chunk[0][0]]
        image_seeds = [(seeds[i] + k) % (MAX_SEED + 1) for i, k in chunk]
        choices = [(SERVED.adapters[a.name], a.scale) for a in first.adapters]
        with self._lock:
            started = time.perf_counter()
            self.adapters.activate(choices)
            switch = self.adapters.last_switch_s
            self.pipe.scheduler = make_scheduler(first.scheduler, self.scheduler_config)
            failpoints.hit("pipeline", size=len(chunk))
            try:
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
                    callback_on_step_end=_report_progress,
                ).images
            finally:
                SERVED.progress = (0, 0)  # also when the call fails: the GPU is idle again
            compute = time.perf_counter() - started
        metrics.images(len(chunk))
        used = [
            AdapterUsed(name=e.name.removeprefix("lora-"), version=e.version, scale=s)
            for e, s in choices
        ]
        timings = {
            "pipeline_s": round(compute, 4),
            "adapter_switch_s": round(switch, 4),
            "batch_images": len(chunk),
            "batch_requests": batch_requests,
        }
        return [
            Pending(
                request=requests[i],
                seed=seed,
                adapters=used,
                base=self.base.tag,
                encoded=self.encoder.submit(image, requests[i].output_format),
                timings=timings,
            )
            for (i, _), image, seed in zip(chunk, images, image_seeds, strict=True)
        ]

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResponse]:
        """All images of all requests through CLIP together, then split per request."""
        if not requests:
            return []
        images = [image for r in requests for image in r._decoded]
        texts = [text for r in requests for text in r.texts]
        started = time.perf_counter()
        with self._lock:
            image_emb = self.scorer.image_embeddings(images)
            text_emb = self.scorer.text_embeddings(texts) if texts else None
        SERVED.record_batch("/score", time.perf_counter() - started, len(requests))
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


@dataclass(frozen=True)
class Pending:
    """An image generated and being encoded (see service.encoder)."""

    request: GenerateRequest
    seed: int
    adapters: list[AdapterUsed]
    base: str
    encoded: Encoded
    timings: dict

    def finish(self) -> GeneratedImage:
        data, encode_s = self.encoded.result()
        settings = self.request.model_dump(exclude={"adapters"}) | {
            "seed": self.seed,
            "base": self.base,
        }
        return GeneratedImage(
            image=data,
            format=self.request.output_format,
            seed=self.seed,
            adapters=self.adapters,
            settings=settings,
            timings=self.timings | {"encode_s": round(encode_s, 4)},
        )


def _report_progress(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
    """Called by the pipeline after each denoising step: the UI shows it as progress."""
    SERVED.progress = (step + 1, pipe.num_timesteps)
    return callback_kwargs


def free_device_memory(device: str) -> None:
    """Give back what a failed call held, so the next request starts from a clean allocator."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

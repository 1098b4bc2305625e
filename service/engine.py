"""The work behind the endpoints: one pipeline call per group of compatible requests, CLIP scores.

Requests in a batch are grouped by everything the pipeline takes as one value (size, steps,
guidance, scheduler, whether there is a negative prompt). Adapters are not among them: a call
whose images use different adapter sets gives each image its own low-rank terms
(service.adapter_cache, models.lora_batched), one UNet pass for all; only a set that cannot
take part (LoRA on convolutions, ranks over BENTOLORA_MIXED_MAX_RANK, peft mode) runs as a call
of its own. Each image has its own generator seeded from its request, so an image does not
depend on what it was batched with (to within 2/255 per pixel value: a batched matrix product
takes other BLAS paths than a single one, and a merged adapter rounds differently from a
per-image term).

The engine publishes what it serves into its `ServerState` (service.state) and is the only
writer of its live status. The pipeline and CLIP are separate modules with separate locks: a
score does not wait for an image batch.
"""

from __future__ import annotations

import concurrent.futures
import functools
import gc
import logging
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import TYPE_CHECKING

import torch
from bentoml.exceptions import BentoMLException, InvalidArgument, ServiceUnavailable

from models import failpoints
from models.adapter import AdapterError
from models.bases import get_base
from models.clip import ClipScorer
from models.loading import load_pipeline
from models.lora_batched import PerImageLora
from models.pipeline_speed import model_calls, speed_up
from models.store import StoreEntry
from service import metrics
from service.adapter_cache import AdapterCache, set_key
from service.adapter_selection import StoreAdapters, select_adapters
from service.call_trimming import CallAbandoned, Trim
from service.encoder import Encoded, Encoder
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
from service.state import ServedSnapshot, ServerState
from service.step_scheduler import StepScheduler, Submission

if TYPE_CHECKING:
    from service.image_modes import ImageModes
    from service.schemas import (
        ControlNetRequest,
        Img2ImgRequest,
        InpaintRequest,
        RefinedRequest,
        RefineRequest,
    )

log = logging.getLogger(__name__)

Choices = tuple[tuple[StoreEntry, float], ...]
"""The adapter versions one request is served with, and their scales."""


def group_key(request: GenerateRequest) -> tuple:
    """What the requests of one pipeline call must share."""
    return (
        request.width,
        request.height,
        request.steps,
        request.guidance,
        request.scheduler,
        # An empty negative prompt means zeroed negative embeddings in SDXL (as diffusers does
        # for None), which a batch can only express for all its members at once.
        bool(request.negative_prompt),
        tuple(sorted(request.micro_conditioning().items())),
    )


class Engine:
    """The pipeline and the CLIP scorer of one server. `state` (made here when not given) holds
    what it serves, which it publishes, and its live status, which it alone writes."""

    def __init__(self, settings: Settings, state: ServerState | None = None):
        self.settings = settings
        self.state = state if state is not None else ServerState(settings)
        self.live = self.state.live
        self.device = settings.torch_device()
        self.base = get_base(settings.base)
        self.pipe = load_pipeline(
            f"store:{self.base.tag}", dtype=settings.torch_dtype(), device=self.device
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler_config = dict(self.pipe.scheduler.config)
        speed = settings.speed_options()
        self._recompile_limit = speed_up(self.pipe, speed, self.device)  # before any merge
        mixed = None
        if settings.lora_mode == "fused" and settings.mixed_max_rank > 0:
            mixed = PerImageLora(
                self.pipe, slots=settings.max_batch_images + 1, max_rank=settings.mixed_max_rank
            )
        self.adapters = AdapterCache(
            self.pipe,
            self.base,
            mode=settings.lora_mode,
            device=self.device,
            device_bytes=settings.adapter_device_bytes,
            host_bytes=settings.adapter_host_bytes,
            mixed=mixed,
            on_change=lambda tiers: setattr(self.live, "adapter_tiers", tiers),
        )
        self.scorer = ClipScorer.from_store(settings.clip, device=self.device)
        self.encoder = Encoder(settings.encode_workers)
        self.encoder.start()
        self._lock = threading.Lock()  # one pipeline, one batch at a time
        self._clip_lock = threading.Lock()  # one CLIP, one score batch at a time
        self.steps = StepScheduler(self) if settings.scheduling == "step" else None
        """The step scheduler (BENTOLORA_SCHEDULING=step), else None: request-level batches."""
        default_size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        found = select_adapters(self.pipe, self.base, settings)
        self.adapters.prepare_mixed(list(found.served.values()))
        if settings.warmup:
            self.warm_up(default_size)
        # Own instances: request validation tokenizes on the event loop while a batch tokenizes
        # in the pipeline; a fast tokenizer shared across threads switches padding/truncation
        # under the other caller (seen under load as "expected sequence of length 13 (got 12)").
        # Loaded afresh, since a deepcopy loses the decoder that error messages use.
        tokenizers = tuple(
            type(t).from_pretrained(self.base.path / folder)
            for t, folder in (
                (self.pipe.tokenizer, "tokenizer"),
                (self.pipe.tokenizer_2, "tokenizer_2"),
            )
        )
        self.state.publish(
            ServedSnapshot(
                settings=settings,
                loaded=True,
                base_tag=self.base.tag,
                default_size=default_size,
                adapters=found.served,
                refused_adapters=found.refused,
                foreign_adapters=found.foreign,
                tokenizers=tokenizers,
            )
        )
        log.info(
            "serving %s with %d adapters on %s (LoRA %s; speed-ups: %s)",
            self.base.tag,
            len(found.served),
            self.device,
            settings.lora_mode,
            speed.describe(),
        )

    def warm_up(self, size: int, steps: int = 2) -> None:
        """Compile and allocate before the first request, for the path this engine serves by."""
        if self.steps is not None:
            self.steps.warm_up(size, steps)
        else:
            self._warm_up_pipeline(size, steps)

    def _warm_up_pipeline(self, size: int, steps: int) -> None:
        """Run the pipeline once per batch size served at `size` (1 and the largest): compiles
        and allocates before the first request. The UNet runs the same shapes at any step
        count, so two steps are enough."""
        passes = [(n, False) for n in sorted({1, self.settings.max_batch_images})]
        if self.adapters.mixed is not None and self.settings.max_batch_images > 1:
            passes.append((self.settings.max_batch_images, True))  # the per-image terms on
        for n, mixed in passes:
            started = time.perf_counter()
            with self._lock, self.model_calls():
                if mixed:
                    self.adapters.activate_mixed([()], [0] * n)
                else:
                    self.adapters.activate(())
                self.pipe(
                    prompt=["warm-up"] * n,
                    width=size,
                    height=size,
                    num_inference_steps=steps,
                    guidance_scale=5.0,
                    generator=torch.Generator("cpu").manual_seed(0),
                )
            log.info(
                "warm-up: %d images of %d px%s in %.1f s",
                n,
                size,
                " (per-image LoRA terms on)" if mixed else "",
                time.perf_counter() - started,
            )
        with self._lock:
            self.adapters.activate(())

    def reload_adapters(self) -> ServedSnapshot:
        """Re-read the store (new adapters, new versions) and publish what is served now.
        Requests validated before keep the versions they were validated against."""
        with self._lock:  # the checks read the pipeline's layers
            found = select_adapters(self.pipe, self.base, self.settings)
        return self.serve_adapters(found)

    def serve_adapters(self, found: StoreAdapters, forget: Iterable[str] = ()) -> ServedSnapshot:
        """Publish `found` (a selection made off the pipeline, by service.store_watcher) and drop
        the loaded weights of the versions `forget` (an admin unloaded or denied them). The lock
        is held for that: forgetting rewrites fused weights."""
        with self._lock:
            snapshot = replace(
                self.state.snapshot,
                adapters=found.served,
                refused_adapters=found.refused,
                foreign_adapters=found.foreign,
            )
            self.state.publish(snapshot)
            dropped = [tag for tag in forget if self.adapters.forget(tag)]
        log.info(
            "adapters selected: %d served, %d refused; weights dropped: %s",
            len(found.served),
            len(found.refused),
            ", ".join(dropped) or "none",
        )
        return snapshot

    def adapters_resident(self, request: GenerateRequest) -> bool:
        """The request's adapters are on the device (its batch will not wait for a load)."""
        try:
            return self.adapters.resident(self._choices(request, self.state.snapshot))
        except InvalidArgument:
            return True  # nothing to load; generate answers it

    def load_adapters(self, requests: Sequence[GenerateRequest]) -> None:
        """Bring the requests' adapters to the device, beside any running batch."""
        snapshot = self.state.snapshot
        for request in requests:
            self.adapters.prefetch(self._choices(request, snapshot))

    def model_calls(self):
        """Context for each call of the (maybe compiled) pipeline, in whatever thread."""
        return model_calls(self._recompile_limit)

    def submit(self, requests: Sequence[GenerateRequest]) -> concurrent.futures.Future:
        """Step mode: queue `requests` on the step scheduler; the future gets their responses."""
        choices, seeds = self._prepare(requests)
        started = time.perf_counter()
        future = self.steps.submit(
            Submission(requests, choices, seeds, concurrent.futures.Future())
        )
        future.add_done_callback(
            lambda _: self.live.record_batch(
                "/generate", time.perf_counter() - started, len(requests)
            )
        )
        return future

    def _prepare(self, requests: Sequence[GenerateRequest]) -> tuple[list[Choices], list[int]]:
        """Each request's adapter versions (checked still stored) and seed."""
        snapshot = self.state.snapshot
        choices = [self._choices(request, snapshot) for request in requests]
        self._check_still_stored(choices)
        seeds = [r.seed if r.seed is not None else secrets.randbelow(MAX_SEED) for r in requests]
        return choices, seeds

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResponse]:
        """The images of `requests`: through the step scheduler in step mode, else one pipeline
        call per group of alike requests (at most BENTOLORA_MAX_BATCH_IMAGES images each)."""
        if not requests:
            return []
        if self.steps is not None:
            return self.submit(requests).result()
        choices, seeds = self._prepare(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[group_key(request)].append(index)
        results: list[list[Pending]] = [[] for _ in requests]
        started = time.perf_counter()
        for indices in groups.values():
            jobs = [(i, k) for i in indices for k in range(requests[i].num_images)]
            step = call_size(requests[indices[0]], self.settings.max_batch_images)
            for start in range(0, len(jobs), step):
                chunk = wanted(
                    requests, jobs[start : start + step], self.settings.request_timeout_s
                )
                for part in self._passes(chunk, choices):
                    sets = [choices[i] for i, _ in part]
                    run = self._run_fitting(requests, seeds, part, len(requests), sets)
                    for (i, _), image in zip(part, run, strict=True):
                        if image is not None:  # None: it left the call (service.call_trimming)
                            results[i].append(image)
        # Encoding ran beside the later groups' pipeline calls; collected last.
        responses = self.responses(results)
        self.live.record_batch("/generate", time.perf_counter() - started, len(requests))
        return responses

    @staticmethod
    def responses(images: Sequence[Sequence[Pending]]) -> list[GenerateResponse]:
        """One response per request from its images (waits for their encoding)."""
        return [GenerateResponse(images=[p.finish() for p in mine]) for mine in images]

    def pending(
        self, request, seed: int, choices: Choices, image, timings: dict, mode: str | None = None
    ) -> Pending:
        """`image` of `request` handed to the encoder, with what its response will say (`mode`:
        the image mode that made it, service.image_modes; None for /generate)."""
        return Pending(
            request=request,
            seed=seed,
            adapters=[adapter_used(e, s) for e, s in choices],
            base=self.base.tag,
            encoded=self.encoder.submit(image, request.output_format),
            timings=timings,
            mode=mode,
        )

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list:
        """PIL images from final latents, as the pipeline decodes them (its VAE, its scaling,
        float32 for an fp16 VAE that needs it, its watermark and post-processing)."""
        pipe, vae = self.pipe, self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        dtype = torch.float32 if upcast else vae.dtype
        mean, std = (
            getattr(vae.config, "latents_mean", None),
            getattr(vae.config, "latents_std", None),
        )
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        if upcast:
            vae.to(torch.float32)
        try:
            image = vae.decode(latents.to(dtype), return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)
        if pipe.watermark is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type="pil")

    def step_failed(self, err: Exception) -> Exception:
        """What the requests in flight get when a step of the step scheduler raised `err`."""
        if isinstance(err, torch.OutOfMemoryError):
            metrics.oom()
            free_device_memory(self.device)
            return ServiceUnavailable(
                self.live.mark_unavailable(
                    "out of GPU memory for the images in flight; retry when the server is less "
                    "busy, or lower BENTOLORA_MAX_BATCH_IMAGES"
                )
            )
        if isinstance(err, torch.AcceleratorError):
            self.live.broken = str(err).splitlines()[0]
            log.critical("device failed, the server must restart: %s", err)
            return ServiceUnavailable(
                self.live.mark_unavailable(f"the GPU failed ({self.live.broken}); restarting")
            )
        log.exception("a denoising step failed", exc_info=err)
        return err

    def _passes(
        self, chunk: list[tuple[int, int]], choices: Sequence[Choices]
    ) -> list[list[tuple[int, int]]]:
        """`chunk` as pipeline calls: one for all images whose adapter sets can share a pass
        (any mix of them), one per set that cannot."""
        distinct = {set_key(choices[i]): choices[i] for i, _ in chunk}
        if len(distinct) <= 1:
            return [chunk] if chunk else []
        alone = set()
        for key, adapter_set in distinct.items():
            why = self.adapters.mixable(adapter_set)
            if why is not None:
                log.info("adapter set %s runs as its own call: %s", _names(adapter_set), why)
                alone.add(key)
        shared = [job for job in chunk if set_key(choices[job[0]]) not in alone]
        own = [
            [job for job in chunk if set_key(choices[job[0]]) == k] for k in distinct if k in alone
        ]
        return [p for p in [shared, *own] if p]

    def _choices(self, request: GenerateRequest, snapshot: ServedSnapshot) -> Choices:
        """The versions `request` is served with: those pinned when it was validated; for a
        request validated without a server (a direct caller), those served now."""
        choices = []
        for adapter in request.adapters:
            entry = adapter.pinned or snapshot.adapters.get(adapter.name)
            if entry is None:
                raise InvalidArgument(snapshot.why_not_served(adapter.name))
            choices.append((entry, adapter.scale))
        return tuple(choices)

    def _check_still_stored(self, choices: Sequence[Choices]) -> None:
        """A version a request was validated against may have left the store since (deleted,
        then an adapter reload): answered 410 naming it, before any compute, unless its weights
        are still loaded. BentoML answers a batch as one, so its other requests get it too."""
        for entry, _ in {e.tag: (e, s) for c in choices for e, s in c}.values():
            if not self.adapters.holds(entry) and not entry.path.is_dir():
                raise AdapterGone(entry)

    def _run_fitting(
        self, requests, seeds, chunk, batch_requests: int, sets: list[Choices]
    ) -> list[Pending]:
        """`_run`, halving the batch when the GPU runs out of memory; a single image that does
        not fit is answered 503. An unrecoverable device error marks the server broken (then
        /livez fails and the orchestrator restarts it)."""
        try:
            return self._run(requests, seeds, chunk, batch_requests, sets)
        except torch.OutOfMemoryError:
            metrics.oom()
            free_device_memory(self.device)
            if len(chunk) == 1:
                first = requests[chunk[0][0]]
                raise ServiceUnavailable(
                    self.live.mark_unavailable(
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
                requests, seeds, chunk[:half], batch_requests, sets[:half]
            ) + self._run_fitting(requests, seeds, chunk[half:], batch_requests, sets[half:])
        except torch.AcceleratorError as err:
            self.live.broken = str(err).splitlines()[0]
            log.critical("device failed, the server must restart: %s", err)
            raise ServiceUnavailable(
                self.live.mark_unavailable(f"the GPU failed ({self.live.broken}); restarting")
            ) from None

    def _run(
        self, requests, seeds, chunk, batch_requests: int, sets: list[Choices]
    ) -> list[Pending | None]:
        """One pipeline call for the images `chunk`; image j uses the adapters `sets[j]`.
        An image whose request becomes unwanted during the call leaves it at the next step
        (service.call_trimming): None in its place."""
        first = requests[chunk[0][0]]
        image_seeds = [(seeds[i] + k) % (MAX_SEED + 1) for i, k in chunk]
        keys = [set_key(c) for c in sets]
        distinct = list({k: c for k, c in zip(keys, sets, strict=True)}.values())
        order = list(dict.fromkeys(keys))

        def set_rows(kept: list[int]) -> None:
            if len(distinct) > 1:
                self.adapters.activate_mixed(distinct, [order.index(keys[j]) for j in kept])

        generators = [torch.Generator("cpu").manual_seed(s) for s in image_seeds]
        trim = Trim(
            [requests[i] for i, _ in chunk],
            lambda request: request.unwanted(self.settings.request_timeout_s),
            rows=True,
            generators=generators,
            on_rows=set_rows,
            then=self._report_progress,
        )
        with self._lock:
            started = time.perf_counter()
            try:
                if len(distinct) == 1:
                    self.adapters.activate(distinct[0])
                else:
                    set_rows(list(range(len(chunk))))
            except (AdapterError, OSError):
                gone = [e for c in distinct for e, _ in c if not e.path.is_dir()]
                if not gone:
                    raise
                raise AdapterGone(gone[0]) from None  # left the store since the check above
            switch = self.adapters.last_switch_s
            self.pipe.scheduler = make_scheduler(first.scheduler, self.scheduler_config)
            failpoints.hit("pipeline", size=len(chunk))
            try:
                with self.model_calls():
                    images = self.pipe(
                        prompt=[requests[i].prompt for i, _ in chunk],
                        negative_prompt=[requests[i].negative_prompt for i, _ in chunk]
                        if first.negative_prompt
                        else None,
                        width=first.width,
                        height=first.height,
                        num_inference_steps=first.steps,
                        guidance_scale=first.guidance,
                        **first.micro_conditioning(),
                        generator=generators,
                        callback_on_step_end=trim,
                        callback_on_step_end_tensor_inputs=trim.tensor_inputs,
                    ).images
            except CallAbandoned:
                log.info("every image of a call became unwanted; it stopped at a step")
                images = []
            finally:
                self.live.progress = (0, 0)  # also when the call fails: the GPU is idle again
            compute = time.perf_counter() - started
        metrics.images(len(images))
        timings = {
            "pipeline_s": round(compute, 4),
            "adapter_switch_s": round(switch, 4),
            "batch_images": len(chunk),
            "batch_requests": batch_requests,
            "batch_adapter_sets": len(distinct),
        }
        return [
            self.pending(requests[i], seed, adapter_set, image, timings)
            if image is not None
            else None
            for (i, _), image, seed, adapter_set in zip(
                chunk, trim.keep(images), image_seeds, sets, strict=True
            )
        ]

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResponse]:
        """All images of all requests through CLIP together, then split per request."""
        if not requests:
            return []
        images = [image for r in requests for image in r._decoded]
        texts = [text for r in requests for text in r.texts]
        started = time.perf_counter()
        with self._clip_lock:  # not the pipeline's: CLIP is its own module
            image_emb = self.scorer.image_embeddings(images)
            text_emb = self.scorer.text_embeddings(texts) if texts else None
        self.live.record_batch("/score", time.perf_counter() - started, len(requests))
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

    def _report_progress(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """Called by the pipeline after each denoising step: the UI shows it as progress."""
        self.live.progress = (step + 1, pipe.num_timesteps)
        return callback_kwargs

    # -- image modes (service.image_modes): delegation only --------------------------------

    @functools.cached_property
    def image_modes(self) -> ImageModes:
        from service.image_modes import ImageModes

        return ImageModes(self)

    def img2img(self, requests: Sequence[Img2ImgRequest]) -> list[GenerateResponse]:
        return self.image_modes.run("img2img", requests)

    def inpaint(self, requests: Sequence[InpaintRequest]) -> list[GenerateResponse]:
        return self.image_modes.run("inpaint", requests)

    def controlnet(self, requests: Sequence[ControlNetRequest]) -> list[GenerateResponse]:
        return self.image_modes.run("controlnet", requests)

    def handoff(self, requests: Sequence[RefinedRequest]) -> list[GenerateResponse]:
        return self.image_modes.run("handoff", requests)

    def refine(self, requests: Sequence[RefineRequest]) -> list[GenerateResponse]:
        return self.image_modes.run("refine", requests)


def adapter_used(entry: StoreEntry, scale: float) -> AdapterUsed:
    """What a response says of an adapter it used: enough to ask for the same image again."""
    return AdapterUsed(
        name=entry.name.removeprefix("lora-"),
        version=entry.version,
        content_hash=entry.metadata.get("content_hash", ""),
        scale=scale,
    )


def _names(adapter_set: Choices) -> str:
    return "+".join(f"{e.name.removeprefix('lora-')}×{s:g}" for e, s in adapter_set) or "none"


class AdapterGone(BentoMLException):
    """A request's adapter version left the store after the request was validated."""

    def __init__(self, entry: StoreEntry):
        name = entry.name.removeprefix("lora-")
        super().__init__(
            f"adapter {name!r} (version {entry.version}) left the model store after this "
            "request was accepted; GET /adapters/ lists what this server serves now",
            error_code=HTTPStatus.GONE,
        )


def call_size(request: GenerateRequest, max_batch_images: int) -> int:
    """Images in one pipeline call for requests alike `request` (see `alone_in_a_call`)."""
    return 1 if request.alone_in_a_call() else max_batch_images


def wanted(
    requests: Sequence[GenerateRequest], chunk: list[tuple[int, int]], timeout_s: float
) -> list[tuple[int, int]]:
    """The jobs of `chunk` someone will read: a request past its deadline (its own `deadline_s`
    or the server's `timeout_s`) has been answered 504 already, and one whose client
    disconnected 499, so computing them would only delay the rest."""
    late = {i for i, _ in chunk if requests[i].time_left(timeout_s) < 0}
    gone = {i for i, _ in chunk if requests[i].client_gone} - late
    if late:
        metrics.dropped(len(late))
        log.warning("dropping %d request(s) past their deadline, unrun", len(late))
    if gone:
        log.info("skipping %d request(s) whose client disconnected", len(gone))
    return [(i, k) for i, k in chunk if i not in late | gone]


NOT_SETTINGS: dict = {
    "adapters": True,
    "image": True,
    "mask": True,
    "controlnets": {"__all__": {"image"}},
    "deadline_s": True,
}
"""Request fields a response's settings leave out: adapters (listed apart), client images, the
deadline (not a setting of the image). Fields left unset (None: micro-conditioning) too."""


@dataclass(frozen=True)
class Pending:
    """An image generated and being encoded (see service.encoder)."""

    request: GenerateRequest
    seed: int
    adapters: list[AdapterUsed]
    base: str
    encoded: Encoded
    timings: dict
    mode: str | None = None
    """The image mode that made it (service.image_modes); None: /generate."""

    def finish(self) -> GeneratedImage:
        data, encode_s = self.encoded.result()
        mode = {"mode": self.mode} if self.mode is not None else {}
        settings = self.request.model_dump(exclude=NOT_SETTINGS, exclude_none=True) | {
            "seed": self.seed,
            "base": self.base,
            **mode,
        }
        return GeneratedImage(
            image=data,
            format=self.request.output_format,
            seed=self.seed,
            adapters=self.adapters,
            settings=settings,
            timings=self.timings | {"encode_s": round(encode_s, 4)},
        )


def free_device_memory(device: str) -> None:
    """Give back what a failed call held, so the next request starts from a clean allocator."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

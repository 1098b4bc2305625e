"""Continuous batching at denoising-step granularity (BENTOLORA_SCHEDULING=step).

The request-level path (service.batcher + Engine.generate) runs a batch's whole pipeline call,
all its steps, before it takes the next batch: a request that arrives meanwhile waits for it.
Here one loop owns the UNet and, at every iteration:

1. admits waiting images into free slots (up to BENTOLORA_MAX_BATCH_IMAGES, one resolution at a
   time, oldest request first), encoding their prompts with their own adapters;
2. runs ONE UNet forward for every image in flight, each at its own timestep, with its own
   prompt embeddings, guidance scale and adapter set (per-image LoRA terms when the sets
   differ, the set merged into the weights when there is one); the batch is padded to a bucket
   size (1, 2, 4, … the maximum) so a compiled UNet sees few shapes;
3. advances each image's own scheduler instance (any scheduler the service offers: each image
   keeps its own sigmas, multistep history and step index);
4. retires finished images to a decode thread (a batched VAE decode and the encoding, off the
   UNet's loop), and images whose client left or whose deadline passed, at once.

Each image follows the computation diffusers' StableDiffusionXLPipeline does for it alone
(prompt encoding, initial noise from its seed, add_time_ids, classifier-free guidance only when
its guidance is above 1, the scheduler's steps, the VAE decode), so an image equals the image
its request gets served alone to within 2/255, whatever joined or left the batch meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from service import metrics
from service.adapter_cache import set_key
from service.batcher import ClientGone
from service.schedulers import make_scheduler

if TYPE_CHECKING:
    from service.engine import Engine
    from service.schemas import GenerateRequest

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Submission:
    """One call's requests; its future resolves to one GenerateResponse per request."""

    requests: Sequence[GenerateRequest]
    choices: list
    seeds: list[int]
    future: concurrent.futures.Future
    images: list[list] = field(default_factory=list)  # per request: its Pending images
    left: int = 0  # images not finished yet
    waiting: deque = field(default_factory=deque)  # (request index, image index) not admitted
    terms_on: bool = False  # warm-up only: run with the per-image terms on (all slots empty)
    loaded: bool = False  # its adapters were on the device when last looked at, or loaded since
    loading: concurrent.futures.Future | None = None


@dataclass(eq=False)
class Flight:
    """One image being denoised."""

    submission: Submission
    request_index: int
    seed: int
    scheduler: Any
    timesteps: torch.Tensor
    latent: torch.Tensor
    embeds: torch.Tensor  # (2, tokens, dim): negative, positive
    pooled: torch.Tensor  # (2, dim)
    time_ids: torch.Tensor  # (2, 6)
    step_kwargs: dict
    admitted: float = field(default_factory=time.perf_counter)
    step: int = 0
    most_in_flight: int = 0
    most_sets: int = 0

    @property
    def request(self) -> GenerateRequest:
        return self.submission.requests[self.request_index]

    @property
    def choices(self):
        return self.submission.choices[self.request_index]

    @property
    def guided(self) -> bool:
        return self.request.guidance > 1.0


class StepScheduler:
    """The loop above, in a thread of its own, over `engine`'s pipeline (under its lock)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.pipe = engine.pipe
        self.limit = engine.settings.max_batch_images
        self.buckets = sorted({min(2**k, self.limit) for k in range(self.limit.bit_length() + 1)})
        self._waiting: deque[Submission] = deque()
        self._flights: list[Flight] = []
        self._wake = threading.Condition()
        self._stopped = False
        self._set_index: dict | None = None  # adapter set key -> index, when sets differ
        self._decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vae-decode")
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lora-load")
        self._thread = threading.Thread(target=self._loop, name="step-scheduler", daemon=True)
        self._thread.start()

    def submit(self, submission: Submission) -> concurrent.futures.Future:
        """Queue `submission`'s images; thread-safe. Its future gets the responses."""
        for i, request in enumerate(submission.requests):
            submission.images.append([])
            for k in range(request.num_images):
                submission.waiting.append((i, k))
        submission.left = len(submission.waiting)
        with self._wake:
            self._waiting.append(submission)
            self._wake.notify()
        return submission.future

    def warm_up(self, size: int, steps: int) -> None:
        """Run each bucket size once, with the per-image terms off and (when there are terms)
        on: a compiled UNet compiles every shape it will see before traffic."""
        from service.schemas import GenerateRequest

        mixed = self.engine.adapters.mixed is not None
        for n in self.buckets:
            for terms_on in (False, True) if mixed and n > 1 else (False,):
                started = time.perf_counter()
                requests = [
                    GenerateRequest(prompt="warm-up", width=size, height=size, steps=steps, seed=i)
                    for i in range(n)
                ]
                submission = Submission(
                    requests,
                    [()] * n,
                    list(range(n)),
                    concurrent.futures.Future(),
                    terms_on=terms_on,
                )
                self.submit(submission).result()
                log.info(
                    "warm-up (step scheduler): %d images of %d px%s in %.1f s",
                    n,
                    size,
                    " (per-image LoRA terms on)" if terms_on else "",
                    time.perf_counter() - started,
                )

    def in_flight(self) -> list[tuple[int, int]]:
        """(steps done, steps) of each image being denoised now (a snapshot)."""
        return [(f.step, len(f.timesteps)) for f in list(self._flights)]

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=30)
        self._decoder.shutdown(wait=True)
        self._loader.shutdown(wait=False, cancel_futures=True)

    # -- the loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._flights and not self._admissible():
                    self._wake.wait()
                if self._stopped:
                    return
            try:
                self._iteration()
            except Exception as err:  # a step failed: every image in flight fails with it
                self._fail_all(self.engine.step_failed(err))

    def _iteration(self) -> None:
        engine = self.engine
        with engine._lock, engine.model_calls():
            self._retire_unwanted()
            new = self._admit()
            if not self._flights:
                return
            self._activate_adapters()
            if new:
                self._encode(new)
            self._denoise()
        done = [f for f in self._flights if f.step >= len(f.timesteps)]
        if done:
            self._flights = [f for f in self._flights if f.step < len(f.timesteps)]
            self._decoder.submit(self._decode, done)
        engine.live.progress = (
            min(f.step for f in self._flights) if self._flights else 0,
            max((len(f.timesteps) for f in self._flights), default=0),
        )

    # -- admission -----------------------------------------------------------------------

    def _admit(self) -> list[Flight]:
        """Waiting images into free slots: oldest first, at the in-flight resolution (or the
        oldest waiting image's, when nothing is in flight)."""
        new: list[Flight] = []
        with self._wake:
            size = self._size() or self._oldest_size()
            for submission in list(self._waiting):
                if not self._loaded(submission):
                    continue  # its adapters load beside the steps; later requests go first
                while submission.waiting and len(self._flights) + len(new) < self.limit:
                    i, k = submission.waiting[0]
                    request = submission.requests[i]
                    if (request.width, request.height) != size:
                        break
                    submission.waiting.popleft()
                    if not self._unwanted(request, submission):
                        new.append(self._flight(submission, i, k))
                if submission.waiting:  # full, or another size: nothing behind it passes
                    break
                self._waiting.remove(submission)
        self._flights.extend(new)
        return new

    def _admissible(self) -> bool:
        """Some waiting submission has its adapters loaded (called holding `_wake`; starts the
        loads of those that have not)."""
        return any([self._loaded(s) for s in self._waiting])

    def _loaded(self, submission: Submission) -> bool:
        """Whether `submission`'s adapters are on the device; if not, load them in a thread of
        their own (once): the images in flight keep stepping meanwhile."""
        if submission.loaded:
            return True
        if all(self.engine.adapters.resident(c) for c in submission.choices):
            submission.loaded = True
            return True
        if submission.loading is None:
            submission.loading = self._loader.submit(self._load, submission)
        return False

    def _load(self, submission: Submission) -> None:
        try:
            for choices in submission.choices:
                self.engine.adapters.prefetch(choices)
        except Exception as err:  # this submission's own failure (its adapter left the store)
            _fail(submission, err)
        with self._wake:
            submission.loaded = True  # a failed one is then dropped at admission
            self._wake.notify()

    def _size(self) -> tuple[int, int] | None:
        if not self._flights:
            return None
        request = self._flights[0].request
        return request.width, request.height

    def _oldest_size(self) -> tuple[int, int] | None:
        for submission in self._waiting:
            if submission.waiting:
                request = submission.requests[submission.waiting[0][0]]
                return request.width, request.height
        return None

    def _flight(self, submission: Submission, i: int, k: int) -> Flight:
        request = submission.requests[i]
        seed = (submission.seeds[i] + k) % 2**32
        scheduler = make_scheduler(request.scheduler, self.engine.scheduler_config)
        device = self.engine.device
        scheduler.set_timesteps(request.steps, device=device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        generator = torch.Generator("cpu").manual_seed(seed)
        pipe = self.pipe
        shape = (1, pipe.unet.config.in_channels, request.height // 8, request.width // 8)
        latent = randn_tensor(shape, generator=generator, device=torch.device(device))
        latent = latent.to(pipe.unet.dtype) * scheduler.init_noise_sigma
        accepted = inspect.signature(scheduler.step).parameters
        step_kwargs = {"generator": generator} if "generator" in accepted else {}
        if "eta" in accepted:
            step_kwargs["eta"] = 0.0
        return Flight(
            submission=submission,
            request_index=i,
            seed=seed,
            scheduler=scheduler,
            timesteps=scheduler.timesteps,
            latent=latent,
            embeds=None,  # filled by _encode
            pooled=None,
            time_ids=None,
            step_kwargs=step_kwargs,
        )

    # -- adapters and prompts ------------------------------------------------------------

    def _activate_adapters(self) -> None:
        """One set in flight: merged; several: per-image terms (rows in flight order)."""
        adapters = self.engine.adapters
        keys = [set_key(f.choices) for f in self._flights]
        order = list(dict.fromkeys(keys))
        if any(f.submission.terms_on for f in self._flights):
            self._set_index = {k: 0 for k in order}
            adapters.activate_mixed([()], [0] * len(keys))
            return
        if len(order) == 1:
            adapters.activate(self._flights[0].choices)
            self._set_index = None
            return
        sets = [next(f.choices for f in self._flights if set_key(f.choices) == k) for k in order]
        self._set_index = {k: order.index(k) for k in order}
        adapters.activate_mixed(sets, [self._set_index[k] for k in keys])

    def _rows(self, flights: Sequence[Flight], padded: int) -> None:
        """Point the per-image terms' rows at `flights` (then padding rows, no adapter)."""
        if self._set_index is None:
            return
        adapters = self.engine.adapters
        per_image = [self._set_index[set_key(f.choices)] for f in flights]
        slots = adapters.mixed_slots(per_image) + [-1] * (padded - len(flights))
        adapters.mixed.set_rows(slots)

    def _encode(self, new: list[Flight]) -> None:
        """Prompt embeddings of the newly admitted images, with their adapters (as the pipeline
        encodes them: zeros for an empty negative prompt)."""
        pipe = self.pipe
        for negative in (False, True):
            group = [f for f in new if bool(f.request.negative_prompt) == negative]
            if not group:
                continue
            self._rows(group, len(group))
            embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
                prompt=[f.request.prompt for f in group],
                device=torch.device(self.engine.device),
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=[f.request.negative_prompt for f in group] if negative else None,
            )
            for j, flight in enumerate(group):
                flight.embeds = torch.stack([negative_embeds[j], embeds[j]])
                flight.pooled = torch.stack([negative_pooled[j], pooled[j]])
                flight.time_ids = time_ids(pipe, flight.request, embeds.dtype).to(embeds.device)

    # -- one step --------------------------------------------------------------------------

    @torch.no_grad()
    def _denoise(self) -> None:
        flights = self._flights
        n = len(flights)
        bucket = next(b for b in self.buckets if b >= n)
        padded = flights + [flights[0]] * (bucket - n)
        self._rows(flights, bucket)
        # Float timesteps: schedulers differ (DDIM's are integers); the UNet embeds them as floats.
        t = torch.stack([f.timesteps[f.step].to(torch.float32) for f in padded])
        x = torch.cat(
            [f.scheduler.scale_model_input(f.latent, f.timesteps[f.step]) for f in flights]
        )
        x = torch.cat([x, x[:1].expand(bucket - n, *x.shape[1:])]) if bucket > n else x
        embeds = torch.stack([f.embeds for f in padded], dim=1)  # (2, bucket, tokens, dim)
        pooled = torch.stack([f.pooled for f in padded], dim=1)
        time_ids = torch.stack([f.time_ids for f in padded], dim=1)
        noise = self.pipe.unet(
            torch.cat([x, x]),
            torch.cat([t, t]),
            encoder_hidden_states=embeds.flatten(0, 1),
            added_cond_kwargs={
                "text_embeds": pooled.flatten(0, 1),
                "time_ids": time_ids.flatten(0, 1),
            },
            return_dict=False,
        )[0]
        uncond, cond = noise.chunk(2)
        for j, flight in enumerate(flights):
            guidance = flight.request.guidance
            if flight.guided:
                prediction = uncond[j : j + 1] + guidance * (cond[j : j + 1] - uncond[j : j + 1])
            else:  # as the pipeline without guidance: the conditional prediction alone
                prediction = cond[j : j + 1]
            flight.latent = flight.scheduler.step(
                prediction,
                flight.timesteps[flight.step],
                flight.latent,
                **flight.step_kwargs,
                return_dict=False,
            )[0]
            flight.step += 1
            flight.most_in_flight = max(flight.most_in_flight, n)
            flight.most_sets = max(flight.most_sets, len({set_key(f.choices) for f in flights}))

    # -- retiring ------------------------------------------------------------------------

    def _unwanted(self, request: GenerateRequest, submission: Submission) -> bool:
        """The client has left, or the deadline passed: nobody will read this image."""
        late = request.time_left(self.engine.settings.request_timeout_s) < 0
        if not (late or request.client_gone or submission.future.done()):
            return False
        if late:
            metrics.dropped(1)
        self._image_done(submission)
        return True

    def _retire_unwanted(self) -> None:
        kept = []
        for flight in self._flights:
            if not self._unwanted(flight.request, flight.submission):
                kept.append(flight)
        if len(kept) < len(self._flights):
            log.info("retired %d image(s) at step boundary", len(self._flights) - len(kept))
        self._flights = kept

    @torch.no_grad()
    def _decode(self, done: list[Flight]) -> None:
        """A batched VAE decode of finished latents, then each image to its request."""
        try:
            latents = torch.cat([f.latent for f in done])
            images = self.engine.decode_latents(latents)
        except Exception as err:
            for flight in done:
                _fail(flight.submission, err)
            return
        metrics.images(len(done))
        for flight, image in zip(done, images, strict=True):
            pending = self.engine.pending(
                flight.request,
                flight.seed,
                flight.choices,
                image,
                {
                    "pipeline_s": round(time.perf_counter() - flight.admitted, 4),
                    "adapter_switch_s": 0.0,
                    "batch_images": flight.most_in_flight,
                    "batch_requests": len(flight.submission.requests),
                    "batch_adapter_sets": flight.most_sets,
                },
            )
            flight.submission.images[flight.request_index].append(pending)
            self._image_done(flight.submission)

    def _image_done(self, submission: Submission) -> None:
        submission.left -= 1
        if submission.left == 0 and not submission.future.done():
            try:
                submission.future.set_result(self.engine.responses(submission.images))
            except Exception as err:  # an encoding failed
                _fail(submission, err)

    def _fail_all(self, err: Exception) -> None:
        flights, self._flights = self._flights, []
        for submission in {id(f.submission): f.submission for f in flights}.values():
            _fail(submission, err)


def time_ids(pipe: Any, request: GenerateRequest, dtype: torch.dtype) -> torch.Tensor:
    """The (negative, positive) SDXL time ids of `request`'s micro-conditioning, as the
    pipeline makes them for one image: the output size and no crop where a field is absent; the
    negative side the positive one's unless both negative sizes are given."""
    fields = request.micro_conditioning()
    size = (request.height, request.width)
    projection = pipe.text_encoder_2.config.projection_dim

    def ids(original: Any, crop: Any, target: Any) -> torch.Tensor:
        return pipe._get_add_time_ids(
            original, crop, target, dtype=dtype, text_encoder_projection_dim=projection
        )

    positive = ids(
        fields.get("original_size", size),
        fields.get("crops_coords_top_left", (0, 0)),
        fields.get("target_size", size),
    )
    if "negative_original_size" not in fields:  # the request's validation: both or neither
        return torch.cat([positive, positive])
    negative = ids(
        fields["negative_original_size"],
        fields.get("negative_crops_coords_top_left", (0, 0)),
        fields["negative_target_size"],
    )
    return torch.cat([negative, positive])


def _fail(submission: Submission, err: Exception) -> None:
    if not submission.future.done():
        submission.future.set_exception(err)


class StepQueue:
    """The /generate endpoint's entry in step mode, with the Batcher's `submit` interface
    (service.batcher.serve drives either): each call's requests go to the scheduler at once;
    no batching window, the scheduler admits them at its next step."""

    def __init__(self, engine: Engine, endpoint: str = "/generate"):
        self.engine = engine
        self.endpoint = endpoint

    async def submit(self, items: Sequence[Any], gone: Any = None) -> list:
        if not items:
            return []
        future = asyncio.wrap_future(self.engine.submit(items))
        if gone is None:
            return list(await future)
        waiter = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait({future, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if future.done():
            return list(future.result())
        # The scheduler retires its images at the next step (request.client_gone).
        raise ClientGone(started=True)

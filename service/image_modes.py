"""Image-to-image, inpainting, ControlNet: /img2img, /inpaint and /controlnet on the served base's
own components (and text-to-image for long jobs, service.jobs).

diffusers' `StableDiffusionXLImg2ImgPipeline` and `StableDiffusionXLInpaintPipeline` are made
once with `from_pipe(engine.pipe)`: they hold the same UNet, text encoders and VAE objects, so
the adapters the engine's adapter cache merges (or keeps as PEFT layers) are in them too, and no
weight is copied. Each call runs under the engine's pipeline lock.

Requests are grouped as /generate's are (size, steps, guidance, scheduler, negative prompt or
not), and further by what these pipelines take as one value for a call (strength, the SDXL
micro-conditioning) and by adapter set (each call has one set merged): a group runs in pipeline
calls of at most BENTOLORA_MAX_BATCH_IMAGES images, each image with its own generator (the
request's seed + its index), so an image does not depend on what it was batched with.

Strength: diffusers runs int(steps × strength) denoising steps, and refuses a call where that
is 0 (img2img fails in the UNet, inpainting raises). Here such a request (strength 0, or too
small for one step) runs no step: its answer is the VAE round trip of its image, the latents
diffusers would start from (sampled from the VAE posterior with the image's generator) decoded.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from bentoml.exceptions import InvalidArgument, ServiceUnavailable
from diffusers import (
    MultiControlNetModel,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    retrieve_latents,
)

from models import failpoints
from service import metrics
from service.batcher import Batcher
from service.call_trimming import CallAbandoned, Trim
from service.schedulers import make_scheduler
from service.schemas import (
    MAX_SEED,
    GenerateResponse,
    Img2ImgRequest,
    InpaintRequest,
)

log = logging.getLogger(__name__)

PIPELINES = {
    "generate": StableDiffusionXLPipeline,
    "img2img": StableDiffusionXLImg2ImgPipeline,
    "inpaint": StableDiffusionXLInpaintPipeline,
}
ROUTES = {
    "img2img": "/img2img",
    "inpaint": "/inpaint",
    "controlnet": "/controlnet",
    "handoff": "/generate_with_refiner",
    "refine": "/refine",
    "generate": "/job",
}
"""Each mode's endpoint."""
StepCallback = Callable[[Any, int, Any, dict], dict]
TIME_IDS_IN_PAIRS = ("generate", "controlnet", "handoff")
"""Modes whose pipeline lays out negative time ids per image pair (GenerateRequest.alone_in_a_call)."""
TRIMMABLE = ("generate", "img2img", "refine")
"""Modes whose pipeline loop reads only the tensors its step callback can replace: an unwanted
image leaves the call at the next step (service.call_trimming); in the others, a call stops
once all its images are unwanted."""
ImagesCallback = Callable[[int], None]


def steps_run(request: Any) -> int:
    """The denoising steps diffusers runs for `request` (0: none, the VAE round trip); all of
    them for a text-to-image request (no strength)."""
    strength = getattr(request, "strength", 1.0)
    return min(int(request.steps * strength), request.steps)


def mode_key(request: Any, adapters: tuple) -> tuple:
    """What the requests of one pipeline call must share: what /generate's must
    (service.engine.group_key), and what these pipelines take as one value for a call."""
    from service.engine import group_key

    return (
        *group_key(request),
        getattr(request, "strength", None),
        _control_key(request),
        getattr(request, "handoff", None),
        adapters,
    )


class ImageModes:
    """The text-to-image (for long jobs: service.jobs), img2img and inpainting pipelines of one
    engine, each made on first use."""

    def __init__(self, engine: Any):
        self.engine = engine
        self._pipes: dict[str, Any] = {}
        self._controlnets: OrderedDict[str, Any] = OrderedDict()  # least recently used first
        self._refiner: Any = None
        self._refiner_lock = threading.Lock()

    def refiner(self) -> Any:
        """The refiner BENTOLORA_REFINER names, loaded on first use onto the base's device."""
        with self._refiner_lock:
            if self._refiner is None:
                from models.refiners import load_refiner
                from models.store import StoreError

                tag = self.engine.settings.refiner
                if not tag:
                    raise InvalidArgument("this server has no refiner (BENTOLORA_REFINER)")
                try:
                    self._refiner = load_refiner(
                        tag, dtype=self.engine.settings.torch_dtype(), device=self.engine.device
                    )
                except (StoreError, ValueError) as err:
                    raise InvalidArgument(f"refiner {tag!r}: {err}") from None
                self._refiner_config = dict(self._refiner.scheduler.config)
            return self._refiner

    def pipe(self, mode: str, request: Any = None) -> Any:
        """The pipeline of `mode` (for "controlnet", with `request`'s ControlNets)."""
        if mode == "controlnet":
            return self._controlnet_pipe(tuple(c.name for c in request.controlnets))
        if mode == "refine":
            return self.refiner()
        if mode == "handoff":
            self.refiner()  # loaded (or refused) before the lock
            mode = "generate"
        if mode not in self._pipes:
            made = PIPELINES[mode].from_pipe(self.engine.pipe)
            made.set_progress_bar_config(disable=True)
            self._pipes[mode] = made
        return self._pipes[mode]

    def _controlnet_pipe(self, names: tuple[str, ...]) -> Any:
        """The base's components with the ControlNets `names` (one, or diffusers'
        MultiControlNet of several)."""
        loaded = self.engine.settings.controlnets_loaded
        if len(set(names)) > loaded:
            raise InvalidArgument(
                f"controlnets: {len(set(names))} ControlNets in one request; this server keeps "
                f"at most {loaded} loaded at once (BENTOLORA_CONTROLNETS_LOADED)"
            )
        for name in names:  # the most recently used last: kept when others are unloaded
            if name in self._controlnets:
                self._controlnets.move_to_end(name)
        key = f"controlnet:{'+'.join(names)}"
        if key not in self._pipes:
            models = [self._controlnet(name) for name in names]
            control = models[0] if len(models) == 1 else MultiControlNetModel(models)
            made = StableDiffusionXLControlNetPipeline.from_pipe(
                self.engine.pipe, controlnet=control
            )
            made.set_progress_bar_config(disable=True)
            self._pipes[key] = made
        return self._pipes[key]

    def _controlnet(self, name: str) -> Any:
        """ControlNet `name` on the device: loaded (the version the store holds then) when it is
        not, after unloading the least recently used past BENTOLORA_CONTROLNETS_LOADED."""
        if name not in self._controlnets:
            from models.controlnets import get_controlnet, load_controlnet
            from models.store import StoreError

            while len(self._controlnets) >= self.engine.settings.controlnets_loaded:
                self._unload_controlnet(next(iter(self._controlnets)))
            try:
                model = load_controlnet(get_controlnet(name), self.engine.pipe.unet)
            except (StoreError, ValueError) as err:
                raise InvalidArgument(f"controlnets: {err}") from None
            self._controlnets[name] = model
        return self._controlnets[name]

    def _unload_controlnet(self, name: str) -> None:
        """ControlNet `name` off the device, with every pipeline holding it (called between
        calls: one /controlnet batch runs at a time, its calls one after another)."""
        from service.engine import free_device_memory

        del self._controlnets[name]
        for key in [k for k in self._pipes if name in k.removeprefix("controlnet:").split("+")]:
            del self._pipes[key]
        free_device_memory(self.engine.device)
        log.info("unloaded ControlNet %s (BENTOLORA_CONTROLNETS_LOADED)", name)

    def controlnets_loaded(self) -> list[str]:
        """The ControlNets on the device, least recently used first."""
        return list(self._controlnets)

    def run(
        self,
        mode: str,
        requests: Sequence[Any],
        on_step: StepCallback | None = None,
        on_images: ImagesCallback | None = None,
        timeout_s: float | None = None,
    ) -> list[GenerateResponse]:
        """The responses to `requests` (all of `mode`), in order. `on_step`, when given, is
        called after each denoising step as diffusers' `callback_on_step_end`, and `on_images`
        with the number of images each call made (long jobs count and cancel with them). A
        request nobody will read (client gone, past its deadline: its own `deadline_s` or
        `timeout_s`, by default the server's request timeout) gets no images."""
        from service.engine import wanted

        if not requests:
            return []
        engine = self.engine
        if timeout_s is None:
            timeout_s = engine.settings.request_timeout_s
        snapshot = engine.state.snapshot
        choices = [engine._choices(request, snapshot) for request in requests]
        engine._check_still_stored(choices)
        seeds = [r.seed if r.seed is not None else secrets.randbelow(MAX_SEED) for r in requests]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[mode_key(request, _key(choices[index]))].append(index)
        results: list[list] = [[] for _ in requests]
        started = time.perf_counter()
        for indices in groups.values():
            for planned in _chunks(mode, requests, indices, engine.settings.max_batch_images):
                chunk = wanted(requests, planned, timeout_s)
                if not chunk:
                    continue
                call = Call(
                    mode, requests, seeds, chunk, choices[chunk[0][0]], len(requests), timeout_s
                )
                try:
                    made = self._fitting(call, on_step)
                except CallAbandoned:
                    log.info(
                        "%s: every image of a call became unwanted; it stopped at a step", mode
                    )
                    continue
                # None: an image that left the call (service.call_trimming)
                kept = [(i, p) for (i, _), p in zip(chunk, made, strict=True) if p is not None]
                for i, image in kept:
                    results[i].append(image)
                if on_images is not None:
                    on_images(len(kept))
        responses = engine.responses(results)
        engine.live.record_batch(ROUTES[mode], time.perf_counter() - started, len(requests))
        return responses

    def _fitting(self, call: Call, on_step: StepCallback | None) -> list:
        """`_call`, halving the images when the device runs out of memory (as /generate)."""
        from service.engine import free_device_memory

        try:
            return self._call(call, on_step)
        except torch.OutOfMemoryError:
            metrics.oom()
            free_device_memory(self.engine.device)
            if len(call.chunk) == 1:
                raise ServiceUnavailable(
                    self.engine.live.mark_unavailable(
                        f"out of GPU memory for one {call.first.width}x{call.first.height} "
                        "image; try fewer pixels or retry when the server is less busy"
                    )
                ) from None
            half = len(call.chunk) // 2
            return self._fitting(call.part(0, half), on_step) + self._fitting(
                call.part(half, None), on_step
            )

    def _call(self, call: Call, on_step: StepCallback | None) -> list:
        engine = self.engine
        pipe = self.pipe(call.mode, call.first)  # a ControlNet is loaded outside the lock
        with engine._lock, engine.model_calls():  # the compiled UNet's limits, this thread
            started = time.perf_counter()
            if call.mode != "refine":  # the refiner has its own UNet, no adapters
                engine.adapters.activate(call.adapters)
            switch = engine.adapters.last_switch_s
            config = self._refiner_config if call.mode == "refine" else engine.scheduler_config
            pipe.scheduler = make_scheduler(call.first.scheduler, config)
            failpoints.hit("pipeline", size=len(call.chunk))
            generators = [torch.Generator("cpu").manual_seed(s) for s in call.image_seeds]
            trim = Trim(
                [call.requests[i] for i, _ in call.chunk],
                lambda request: request.unwanted(call.timeout_s),
                rows=call.mode in TRIMMABLE,
                generators=generators,
                then=_progress(engine, on_step),
            )
            try:
                images = trim.keep(self._images(call, pipe, generators, trim))
            finally:
                engine.live.progress = (0, 0)
            compute = time.perf_counter() - started
        metrics.images(sum(image is not None for image in images))
        timings = {
            "pipeline_s": round(compute, 4),
            "adapter_switch_s": round(switch, 4),
            "batch_images": len(call.chunk),
            "batch_requests": call.batch_requests,
            "steps_run": steps_run(call.first),
        }
        return [
            engine.pending(call.requests[i], seed, call.adapters, image, timings, mode=call.mode)
            if image is not None
            else None
            for (i, _), image, seed in zip(call.chunk, images, call.image_seeds, strict=True)
        ]

    def _images(self, call: Call, pipe: Any, generators: list, trim: Trim) -> list:
        """The pipeline call (two for a handoff: the base to `handoff` as latents, the refiner
        from there), or the VAE round trip when no step runs. The images of `trim.kept`."""
        if steps_run(call.first) == 0:
            return vae_round_trip(pipe, call.inputs("_image"), generators)
        steps = {
            "generator": generators,
            "callback_on_step_end": trim,
            "callback_on_step_end_tensor_inputs": trim.tensor_inputs,
        }
        if call.mode != "handoff":
            return pipe(**call.arguments(), **steps).images
        first = call.first
        latents = pipe(
            **call.arguments(), denoising_end=first.handoff, output_type="latent", **steps
        ).images
        refiner = self.refiner()
        refiner.scheduler = make_scheduler(first.scheduler, self._refiner_config)
        return refiner(
            prompt=call.inputs("prompt"),
            negative_prompt=call.inputs("negative_prompt") if first.negative_prompt else None,
            image=latents,
            num_inference_steps=first.steps,
            denoising_start=first.handoff,
            guidance_scale=first.guidance,
            **steps,
        ).images


def _chunks(mode: str, requests: Sequence[Any], indices: list[int], max_images: int) -> list:
    """The images ((request, image) index pairs) of the alike requests `indices`, in calls."""
    from service.engine import call_size

    jobs = [(i, k) for i in indices for k in range(requests[i].num_images)]
    step = call_size(requests[indices[0]], max_images) if mode in TIME_IDS_IN_PAIRS else max_images
    return [jobs[at : at + step] for at in range(0, len(jobs), step)]


def _control_key(request: Any) -> tuple:
    """A call's ControlNets and scales; with several, also the request: diffusers'
    MultiControlNet takes one set of conditioning images per call, so only the images of one
    request (which share theirs) can share a call."""
    controls = getattr(request, "controlnets", ())
    key = tuple((c.name, c.scale) for c in controls)
    return (*key, id(request)) if len(controls) > 1 else key


def _key(adapter_set: tuple) -> tuple:
    return tuple((entry.tag, scale) for entry, scale in adapter_set)


def _progress(engine: Any, on_step: StepCallback | None) -> StepCallback:
    """After each step (once unwanted images have left the call): the live progress, then
    `on_step` (a long job's progress and cancel)."""

    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        engine.live.progress = (step + 1, pipe.num_timesteps)
        return on_step(pipe, step, timestep, kwargs) if on_step is not None else kwargs

    return callback


@dataclass(frozen=True)
class Call:
    """One pipeline call: the images `chunk` ((request index, image index) pairs) of
    `requests`, which share everything `mode_key` names."""

    mode: str
    requests: Sequence[Img2ImgRequest]
    seeds: Sequence[int]
    chunk: list[tuple[int, int]]
    adapters: tuple
    batch_requests: int
    timeout_s: float
    """The deadline of a request without its own `deadline_s`."""

    @property
    def first(self) -> Img2ImgRequest:
        return self.requests[self.chunk[0][0]]

    @property
    def image_seeds(self) -> list[int]:
        return [(self.seeds[i] + k) % (MAX_SEED + 1) for i, k in self.chunk]

    def part(self, start: int, stop: int | None) -> Call:
        return Call(
            self.mode,
            self.requests,
            self.seeds,
            self.chunk[start:stop],
            self.adapters,
            self.batch_requests,
            self.timeout_s,
        )

    def inputs(self, attribute: str) -> list:
        return [getattr(self.requests[i], attribute) for i, _ in self.chunk]

    def _control_arguments(self) -> dict[str, Any]:
        """One ControlNet: its images (one per image of the call) and scale; several: the one
        request's image per ControlNet and their scales (see `_control_key`)."""
        controls = self.inputs("_controls")  # per image: one per ControlNet
        scales = [c.scale for c in self.first.controlnets]
        if len(scales) == 1:
            return {"image": [c[0] for c in controls], "controlnet_conditioning_scale": scales[0]}
        return {"image": list(controls[0]), "controlnet_conditioning_scale": scales}

    def arguments(self) -> dict[str, Any]:
        first = self.first
        arguments: dict[str, Any] = {
            "prompt": self.inputs("prompt"),
            "negative_prompt": self.inputs("negative_prompt") if first.negative_prompt else None,
            "num_inference_steps": first.steps,
            "guidance_scale": first.guidance,
            **first.micro_conditioning(),
        }
        if self.mode in ("img2img", "inpaint", "refine"):
            arguments |= {"image": self.inputs("_image"), "strength": first.strength}
        if self.mode == "controlnet":
            arguments |= self._control_arguments()
        if self.mode not in ("img2img", "refine"):  # these take the image's size
            arguments |= {"width": first.width, "height": first.height}
        if self.mode == "inpaint":
            arguments["mask_image"] = self.inputs("_mask")
        return arguments


@torch.no_grad()
def vae_round_trip(pipe: Any, images: list, generators: list[torch.Generator]) -> list:
    """`images` through the VAE: encoded, a latent sampled from the posterior with each image's
    generator (as diffusers' img2img and inpainting pipelines sample their starting latents),
    decoded. What a request that runs no denoising step gets."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    dtype = torch.float32 if upcast else vae.dtype
    if upcast:
        vae.to(torch.float32)
    try:
        pixels = pipe.image_processor.preprocess(images).to(vae.device, dtype)
        latents = torch.cat(
            [
                retrieve_latents(vae.encode(pixels[i : i + 1]), generator=g)
                for i, g in enumerate(generators)
            ]
        )
        decoded = vae.decode(latents).sample
    finally:
        if upcast:
            vae.to(torch.float16)
    return pipe.image_processor.postprocess(decoded, output_type="pil")


@dataclass(frozen=True)
class ModeBatchers:
    img2img: Batcher
    inpaint: Batcher
    controlnet: Batcher
    handoff: Batcher
    refine: Batcher


def batchers(engine: Any, settings: Any) -> ModeBatchers:
    """The /img2img and /inpaint batchers, as service.batcher.for_engine makes /generate's: a
    window of BENTOLORA_BATCH_WINDOW_MS, whole requests up to BENTOLORA_MAX_REQUEST_IMAGES images,
    adapters loaded beside the running batch."""

    def batcher(mode: str) -> Batcher:
        return Batcher(
            ROUTES[mode],
            getattr(engine, mode),
            lambda request: request.num_images,
            max_images=max(settings.max_request_images, settings.max_batch_images),
            window_s=settings.batch_window_ms / 1000,
            is_ready=engine.adapters_resident,
            prepare=engine.load_adapters,
        )

    return ModeBatchers(
        img2img=batcher("img2img"),
        inpaint=batcher("inpaint"),
        controlnet=batcher("controlnet"),
        handoff=batcher("handoff"),
        refine=batcher("refine"),
    )


__all__ = ["ImageModes", "InpaintRequest", "ModeBatchers", "batchers", "steps_run"]

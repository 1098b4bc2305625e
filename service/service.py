"""The BentoML service: SDXL with LoRA adapters from the model store, batched on the GPU.

BENTOLORA_BASE=sdxl-tiny bentoml serve service.service:SDXLLoRA
"""

from __future__ import annotations

from typing import Annotated

import bentoml
from pydantic import AfterValidator

from service import batcher, bentoml_fixes, metrics
from service.adapter_policy import AdapterPolicy, deny_file
from service.drain import Drain
from service.http_extras import adapter_routes
from service.jobs import JOB_SCALE, JobBoard, JobGate, jobs_app
from service.middleware import install_middleware
from service.mode_routes import controlnet_routes
from service.schemas import (
    GenerateResponse,
    JobDeadline,
    ScoreResponse,
    bind_image_requests,
    bind_requests,
)
from service.settings import Settings
from service.state import ServerState

SETTINGS = Settings.from_env()
STATE = ServerState(SETTINGS)
"""What this server serves and how it is doing (service.state). BentoML builds the routes,
middleware and request models below when it imports this module, before it creates the service
instance, so the holder is made here and passed to each; the instance's engine publishes into it."""
GenerateRequest, ScoreRequest = bind_requests(STATE)
(Img2ImgRequest, InpaintRequest, ControlNetRequest, RefinedRequest, RefineRequest) = (
    bind_image_requests(STATE)
)
DRAIN = Drain(limit_s=SETTINGS.request_timeout_s + 5)
"""Draining after SIGTERM (service.drain): the request guard answers 503 while it lasts."""
POLICY = AdapterPolicy(deny_file())
"""What an admin keeps out of serving (service.adapter_policy): the store's deny list, this
process's unloads. Passed to the instance's store watcher, through which the admin routes act."""
JOBS = JobBoard(
    max_items=SETTINGS.max_request_items * JOB_SCALE,
    max_images=SETTINGS.max_request_images * JOB_SCALE,
)
"""Long jobs' progress and cancel (service.jobs): the task endpoint runs them, /jobs reads them."""
BATCHABLE_ENTRY = SETTINGS.scheduling == "step" and SETTINGS.step_entry == "batchable"
"""/generate as a BentoML batchable API feeding the step scheduler (service.batcher.serve_batch)."""
bentoml_fixes.apply()  # metrics labelled by route, request timers cancelled


def running_watcher():
    """The running instance's store watcher (service.store_watcher), for the /adapters routes."""
    return bentoml.get_current_service().watcher


@bentoml.asgi_app(jobs_app(JOBS), path="/jobs")
@bentoml.asgi_app(controlnet_routes(lambda: SETTINGS.refiner), path="/controlnets")
@bentoml.asgi_app(adapter_routes(STATE, running_watcher), path="/adapters")
@bentoml.service(
    name="bentolora",
    resources={"gpu": 1},
    # The admission queue (BENTOLORA_MAX_QUEUE) refuses overload first, with Retry-After; this
    # is BentoML's last-resort bound over every route.
    traffic={"timeout": SETTINGS.request_timeout_s, "max_concurrency": 1024},
    workers=1,
    # Threads for sync APIs. Ours are async: each endpoint's batcher runs its batches in a
    # worker thread of its own (service.batcher), so a /score batch runs beside a /generate one.
    threads=2,
)
class SDXLLoRA:
    def __init__(self) -> None:
        from service.engine import Engine
        from service.image_modes import batchers as mode_batchers
        from service.memory import return_large_blocks_to_the_system
        from service.store_watcher import StoreWatcher

        return_large_blocks_to_the_system()  # before the models: see service/memory.py

        self.state = STATE
        metrics.start_worker()
        self.engine = Engine(SETTINGS, STATE)
        self.batches = batcher.for_engine(self.engine, SETTINGS)
        self.mode_batches = mode_batchers(self.engine, SETTINGS)  # /img2img, /inpaint, /controlnet
        # Serves adapter versions saved after the start (BENTOLORA_ADAPTER_WATCH_S); applies the
        # deny list before the first request
        self.watcher = StoreWatcher(self.engine, POLICY, SETTINGS, stop_when=lambda: DRAIN.draining)
        self.watcher.start()
        DRAIN.take_over_sigterm()

    @bentoml.on_shutdown
    def stop_watching(self) -> None:
        self.watcher.stop()

    def __is_ready__(self) -> bool:
        return self.state.ready

    def __is_alive__(self) -> bool:
        """False after an unrecoverable GPU error: the orchestrator restarts the container."""
        return not self.state.live.broken

    if BATCHABLE_ENTRY:  # BENTOLORA_STEP_ENTRY=batchable, to compare with the async entry

        @bentoml.api(**batcher.batch_options(SETTINGS))
        async def generate(
            self, requests: list[Annotated[GenerateRequest, AfterValidator(batcher.mark_client)]]
        ) -> list[GenerateResponse]:
            """Images for prompts, with adapters mixed by weight; requests from many clients share a batch."""
            return await batcher.serve_batch(self.batches.generate, requests)

    else:
        # Not BentoML's batchable APIs: its batcher learns how long to wait from past batches,
        # and one large request taught it waits of many seconds for every later request. The
        # service batches itself (service.batcher), with a fixed window and no memory.
        @bentoml.api
        async def generate(
            self, requests: list[GenerateRequest], ctx: bentoml.Context
        ) -> list[GenerateResponse]:
            """Images for prompts, with adapters mixed by weight; requests from many clients share a batch."""
            return await batcher.serve(self.batches.generate, requests, ctx)

    @bentoml.api
    async def score(
        self, requests: list[ScoreRequest], ctx: bentoml.Context
    ) -> list[ScoreResponse]:
        """CLIP scores of images against texts, and image-image similarity."""
        return await batcher.serve(self.batches.score, requests, ctx)

    @bentoml.api
    async def img2img(
        self, requests: list[Img2ImgRequest], ctx: bentoml.Context
    ) -> list[GenerateResponse]:
        """Images redrawn from an init image (strength: how much), batched as /generate's."""
        return await batcher.serve(self.mode_batches.img2img, requests, ctx)

    @bentoml.api
    async def inpaint(
        self, requests: list[InpaintRequest], ctx: bentoml.Context
    ) -> list[GenerateResponse]:
        """Images redrawn where the mask is white, kept where it is black."""
        return await batcher.serve(self.mode_batches.inpaint, requests, ctx)

    @bentoml.api
    async def controlnet(
        self, requests: list[ControlNetRequest], ctx: bentoml.Context
    ) -> list[GenerateResponse]:
        """Images that follow a conditioning image's structure, through a stored ControlNet."""
        return await batcher.serve(self.mode_batches.controlnet, requests, ctx)

    @bentoml.api
    async def generate_with_refiner(
        self, requests: list[RefinedRequest], ctx: bentoml.Context
    ) -> list[GenerateResponse]:
        """Images whose last denoising steps the refiner (BENTOLORA_REFINER) takes over."""
        return await batcher.serve(self.mode_batches.handoff, requests, ctx)

    @bentoml.api
    async def refine(
        self, requests: list[RefineRequest], ctx: bentoml.Context
    ) -> list[GenerateResponse]:
        """The refiner as image-to-image on a client's image."""
        return await batcher.serve(self.mode_batches.refine, requests, ctx)

    @bentoml.task
    async def job(
        self,
        requests: list[GenerateRequest],
        ctx: bentoml.Context,
        deadline_s: JobDeadline = None,
    ) -> list[GenerateResponse]:
        """Many images in the background: POST /job/submit answers a task id at once; progress
        and cancel at /jobs/{task_id}; the result at GET /job/get?task_id=."""
        task_id = ctx.request.state.task_id  # set by BentoML's task runner
        return await JOBS.run(self.engine.image_modes, task_id, requests, deadline_s)


install_middleware(SDXLLoRA, SETTINGS, STATE, DRAIN)
SDXLLoRA.add_asgi_middleware(JobGate, board=JOBS, max_jobs=SETTINGS.max_queue)
if SETTINGS.ui:  # gradio is imported only for the UI: BENTOLORA_UI=0 serves without it installed
    from service.ui import mount as mount_ui

    SDXLLoRA = mount_ui(SDXLLoRA, SETTINGS, STATE)

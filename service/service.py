"""The BentoML service: SDXL with LoRA adapters from the model store, batched on the GPU.

BENTOLORA_BASE=sdxl-tiny bentoml serve service.service:SDXLLoRA
"""

from __future__ import annotations

import bentoml

from service import batcher, bentoml_fixes, metrics
from service.adapter_policy import AdapterPolicy, deny_file
from service.drain import Drain
from service.http_extras import adapter_routes
from service.middleware import install_middleware
from service.schemas import GenerateResponse, ScoreResponse, bind_requests
from service.settings import Settings
from service.state import ServerState

SETTINGS = Settings.from_env()
STATE = ServerState(SETTINGS)
"""What this server serves and how it is doing (service.state). BentoML builds the routes,
middleware and request models below when it imports this module, before it creates the service
instance, so the holder is made here and passed to each; the instance's engine publishes into it."""
GenerateRequest, ScoreRequest = bind_requests(STATE)
DRAIN = Drain(limit_s=SETTINGS.request_timeout_s + 5)
"""Draining after SIGTERM (service.drain): the request guard answers 503 while it lasts."""
POLICY = AdapterPolicy(deny_file())
"""What an admin keeps out of serving (service.adapter_policy): the store's deny list, this
process's unloads. Passed to the instance's store watcher, through which the admin routes act."""
bentoml_fixes.apply()  # metrics labelled by route, request timers cancelled


def running_watcher():
    """The running instance's store watcher (service.store_watcher), for the /adapters routes."""
    return bentoml.get_current_service().watcher


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
        from service.memory import return_large_blocks_to_the_system
        from service.store_watcher import StoreWatcher

        return_large_blocks_to_the_system()  # before the models: see service/memory.py

        self.state = STATE
        metrics.start_worker()
        self.engine = Engine(SETTINGS, STATE)
        self.batches = batcher.for_engine(self.engine, SETTINGS)
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

    # Not BentoML's batchable APIs: its batcher learns how long to wait from past batches, and
    # one large request taught it waits of many seconds for every later request. The service
    # batches itself (service.batcher), with a fixed window and no memory.
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


install_middleware(SDXLLoRA, SETTINGS, STATE, DRAIN)
if SETTINGS.ui:  # gradio is imported only for the UI: BENTOLORA_UI=0 serves without it installed
    from service.ui import mount as mount_ui

    SDXLLoRA = mount_ui(SDXLLoRA, SETTINGS, STATE)

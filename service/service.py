"""The BentoML service: SDXL with LoRA adapters from the model store, batched on the GPU.

BENTOLORA_BASE=sdxl-tiny bentoml serve service.service:SDXLLoRA
"""

from __future__ import annotations

import bentoml

from service.http_extras import extras
from service.middleware import install_middleware
from service.registry import SERVED
from service.schemas import GenerateRequest, GenerateResponse, ScoreRequest, ScoreResponse
from service.settings import Settings
from service.ui import mount as mount_ui

SETTINGS = Settings.from_env()


@bentoml.asgi_app(extras, path="/adapters")
@bentoml.service(
    name="bentolora",
    resources={"gpu": 1},
    # The admission queue (BENTOLORA_MAX_QUEUE) refuses overload first, with Retry-After; this
    # is BentoML's last-resort bound over every route.
    traffic={"timeout": SETTINGS.request_timeout_s, "max_concurrency": 1024},
    workers=1,
)
class SDXLLoRA:
    def __init__(self) -> None:
        from service.engine import Engine

        self.engine = Engine(SETTINGS)

    def __is_ready__(self) -> bool:
        return SERVED.ready and not SERVED.broken

    def __is_alive__(self) -> bool:
        """False after an unrecoverable GPU error: the orchestrator restarts the container."""
        return not SERVED.broken

    @bentoml.api(batchable=True, max_batch_size=16, max_latency_ms=600_000)
    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResponse]:
        """Images for prompts, with adapters mixed by weight; requests from many clients share a batch."""
        return self.engine.generate(requests)

    @bentoml.api(batchable=True, max_batch_size=64, max_latency_ms=60_000)
    def score(self, requests: list[ScoreRequest]) -> list[ScoreResponse]:
        """CLIP scores of images against texts, and image-image similarity."""
        return self.engine.score(requests)


install_middleware(SDXLLoRA, SETTINGS)
SDXLLoRA = mount_ui(SDXLLoRA, SETTINGS)

"""The BentoML service: SDXL with LoRA adapters from the model store, batched on the GPU.

BENTOLORA_BASE=sdxl-tiny bentoml serve service.service:SDXLLoRA
"""

from __future__ import annotations

import bentoml

from service.http_extras import extras
from service.schemas import GenerateRequest, GenerateResponse, ScoreRequest, ScoreResponse


@bentoml.asgi_app(extras, path="/adapters")
@bentoml.service(
    name="bentolora",
    resources={"gpu": 1},
    traffic={"timeout": 600, "max_concurrency": 64},
    workers=1,
)
class SDXLLoRA:
    def __init__(self) -> None:
        from service.engine import Engine
        from service.settings import Settings

        self.engine = Engine(Settings.from_env())

    @bentoml.api(batchable=True, max_batch_size=16, max_latency_ms=600_000)
    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResponse]:
        """Images for prompts, with adapters mixed by weight; requests from many clients share a batch."""
        return self.engine.generate(requests)

    @bentoml.api(batchable=True, max_batch_size=64, max_latency_ms=60_000)
    def score(self, requests: list[ScoreRequest]) -> list[ScoreResponse]:
        """CLIP scores of images against texts, and image-image similarity."""
        return self.engine.score(requests)

"""Request and response models of the HTTP API. Limits are written as annotated types, so
BentoML's OpenAPI page shows them and a bad field is answered 400 with its location."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, Field, PrivateAttr, field_validator, model_validator

from service.images import ImageInputError, decode
from service.registry import SERVED
from service.schedulers import SCHEDULERS

SchedulerName = Literal["euler", "euler_a", "dpmpp_2m_karras", "ddim", "unipc"]
assert set(SchedulerName.__args__) == set(SCHEDULERS)  # type: ignore[attr-defined]

Prompt = Annotated[str, Field(max_length=2000)]
Side = Annotated[int, Field(ge=64, le=4096, multiple_of=8, description="pixels, a multiple of 8")]
Scale = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
MAX_SEED = 2**32 - 1


class AdapterChoice(BaseModel):
    name: Annotated[
        str, Field(min_length=1, max_length=64, description="adapter name, e.g. my-style")
    ]
    scale: Scale = 1.0

    @field_validator("name")
    @classmethod
    def served(cls, name: str) -> str:
        name = name.removeprefix("lora-")
        if SERVED.ready and name not in SERVED.adapters:
            if name in SERVED.refused_adapters:
                raise ValueError(
                    f"adapter {name!r} is refused by this server: {SERVED.refused_adapters[name]}"
                )
            if name in SERVED.foreign_adapters:
                raise ValueError(
                    f"adapter {name!r} was made for base {SERVED.foreign_adapters[name]}, "
                    f"not for the base this server runs ({SERVED.base_tag})"
                )
            names = sorted(SERVED.adapters)
            known = ", ".join(names[:20]) + (
                f" and {len(names) - 20} more (GET /adapters/)" if len(names) > 20 else ""
            )
            raise ValueError(f"unknown adapter {name!r}; this server has: {known or 'none'}")
        return name


class GenerateRequest(BaseModel):
    prompt: Annotated[Prompt, Field(min_length=1)]
    negative_prompt: Prompt = ""
    width: Side = 1024
    height: Side = 1024
    steps: Annotated[int, Field(ge=1, le=150)] = 30
    guidance: Annotated[float, Field(ge=0.0, le=30.0, allow_inf_nan=False)] = 5.0
    seed: Annotated[int | None, Field(ge=0, le=MAX_SEED, description="random when absent")] = None
    num_images: Annotated[int, Field(ge=1, le=8)] = 1
    scheduler: SchedulerName = "euler"
    adapters: Annotated[list[AdapterChoice], Field(max_length=8)] = []
    output_format: Literal["png", "jpeg", "webp"] = "png"
    _received: float = PrivateAttr(default_factory=time.monotonic)
    """When the request was parsed (its arrival): the deadline counts from here."""

    @field_validator("prompt")
    @classmethod
    def not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt is empty; describe the image to generate")
        return prompt

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def fits_the_text_encoders(cls, text: str) -> str:
        for tokenizer in SERVED.tokenizers:
            ids = tokenizer(text, truncation=False).input_ids
            limit = tokenizer.model_max_length
            if len(ids) > limit:
                cut = tokenizer.decode(ids[limit - 1 : -1])
                raise ValueError(
                    f"{len(ids)} tokens; the text encoders read {limit} (with start and end), "
                    f"so this part would be cut: {cut!r}. Shorten it"
                )
        return text

    @model_validator(mode="after")
    def within_pixel_cap(self) -> GenerateRequest:
        cap = SERVED.settings.max_pixels
        if self.width * self.height > cap:
            raise ValueError(
                f"width × height = {self.width * self.height} is over the {cap} pixel cap"
            )
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError("adapters: each adapter at most once")
        return self


class AdapterUsed(BaseModel):
    name: str
    version: str
    scale: float


class GeneratedImage(BaseModel):
    image: str = Field(description="base64 of the encoded image")
    format: str
    seed: int
    adapters: list[AdapterUsed]
    settings: dict = Field(description="the settings used, after defaults")
    timings: dict = Field(
        description="seconds: queue+batch wait, denoise+decode, encode; batch sizes"
    )


class GenerateResponse(BaseModel):
    images: list[GeneratedImage]


class ScoreRequest(BaseModel):
    images: Annotated[
        list[str], Field(min_length=1, max_length=16, description="base64 PNG/JPEG/WebP")
    ]
    texts: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=2000)]], Field(max_length=16)
    ] = []
    _decoded: list = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def decodable(self) -> ScoreRequest:
        settings = SERVED.settings
        decoded = []
        for i, text in enumerate(self.images):
            try:
                decoded.append(
                    decode(
                        text,
                        max_bytes=settings.max_input_bytes,
                        max_pixels=settings.max_input_pixels,
                    )
                )
            except ImageInputError as err:
                raise ValueError(f"images[{i}]: {err}") from None
        self._decoded = decoded
        return self


class ScoreResponse(BaseModel):
    clip_scores: list[list[float]] = Field(description="[image][text]: 100 × max(cosine, 0)")
    image_similarity: list[list[float]] = Field(
        description="[image][image]: cosine of CLIP embeddings"
    )

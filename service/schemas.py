"""Request and response models of the HTTP API. Limits are written as annotated types, so
BentoML's OpenAPI page shows them and a bad field is answered 400 with its location."""

from __future__ import annotations

import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, PrivateAttr, field_validator, model_validator

from service.images import ImageInputError, decode
from service.schedulers import SCHEDULERS
from service.state import ServedSnapshot, ServerState

SchedulerName = Literal["euler", "euler_a", "dpmpp_2m_karras", "ddim", "unipc"]
assert set(SchedulerName.__args__) == set(SCHEDULERS)  # type: ignore[attr-defined]

Prompt = Annotated[str, Field(max_length=2000)]
Side = Annotated[int, Field(ge=64, le=4096, multiple_of=8, description="pixels, a multiple of 8")]
Scale = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
MAX_SEED = 2**32 - 1


NOT_SERVING = ServedSnapshot()
"""What the models `bind_requests` has not bound validate against: default limits, no models
(so adapter names and prompt lengths are left to the engine, as for its direct callers)."""


def _served(model: type[BaseModel]) -> ServedSnapshot:
    state = getattr(model, "served_by", None)
    return state.snapshot if state is not None else NOT_SERVING


class AdapterChoice(BaseModel):
    served_by: ClassVar[ServerState | None] = None
    """The state whose snapshot names are checked against (set by `bind_requests`)."""

    name: Annotated[
        str, Field(min_length=1, max_length=64, description="adapter name, e.g. my-style")
    ]
    scale: Scale = 1.0
    _entry: Any = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def served(cls, name: str) -> str:
        name = name.removeprefix("lora-")
        snapshot = _served(cls)
        if snapshot.loaded and name not in snapshot.adapters:
            raise ValueError(snapshot.why_not_served(name))
        return name

    @model_validator(mode="after")
    def pin_version(self) -> AdapterChoice:
        snapshot = _served(type(self))
        if snapshot.loaded:
            self._entry = snapshot.adapters.get(self.name)
            if self._entry is None:  # a reload between the name check and here
                raise ValueError(snapshot.why_not_served(self.name))
        return self

    @property
    def pinned(self) -> Any:
        """The StoreEntry (version) `name` had in the snapshot this request was validated
        against: the engine serves that version even if a reload has since changed or dropped
        the name. None for a request validated without a server (the engine looks it up)."""
        return self._entry


class GenerateRequest(BaseModel):
    served_by: ClassVar[ServerState | None] = None
    """The state whose snapshot requests are checked against (set by `bind_requests`)."""

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
    _gone: Any = PrivateAttr(default=None)
    """An asyncio.Event set when the client disconnects (service.batcher attaches it)."""

    @property
    def client_gone(self) -> bool:
        """The client has disconnected: nobody will read this request's images."""
        return self._gone is not None and self._gone.is_set()

    @field_validator("prompt")
    @classmethod
    def not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt is empty; describe the image to generate")
        return prompt

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def fits_the_text_encoders(cls, text: str) -> str:
        for tokenizer in _served(cls).tokenizers:
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
        cap = _served(type(self)).settings.max_pixels
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
    served_by: ClassVar[ServerState | None] = None
    """The state whose settings bound the images (set by `bind_requests`)."""

    images: Annotated[
        list[str], Field(min_length=1, max_length=16, description="base64 PNG/JPEG/WebP")
    ]
    texts: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=2000)]], Field(max_length=16)
    ] = []
    _decoded: list = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def decodable(self) -> ScoreRequest:
        settings = _served(type(self)).settings
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


def bind_requests(state: ServerState) -> tuple[type[GenerateRequest], type[ScoreRequest]]:
    """The request models the service's API takes: the same models, validating against what
    `state` serves at the moment each request is parsed.

    This is how request validation reaches the server's state. BentoML builds its request
    parsing from the API's type annotations when the service module is imported, before the
    service instance exists, and passes pydantic no validation context; so the models carry the
    state (`served_by`), which the service module makes and the engine publishes into."""
    choice = _bound(AdapterChoice, state)
    generate = _bound(
        GenerateRequest,
        state,
        adapters=(Annotated[list[choice], Field(max_length=8)], []),  # type: ignore[valid-type]
    )
    return generate, _bound(ScoreRequest, state)


def _bound(model: type[BaseModel], state: ServerState, **fields: tuple[Any, Any]) -> Any:
    """A subclass of `model` with the same name (the OpenAPI page shows the same schema) bound
    to `state`, with `fields` (name: (annotation, default)) redeclared."""
    namespace: dict[str, Any] = {
        "__module__": model.__module__,
        "__qualname__": model.__qualname__,
        "__annotations__": {name: annotation for name, (annotation, _) in fields.items()},
        "served_by": state,
    }
    namespace.update({name: default for name, (_, default) in fields.items()})
    return type(model.__name__, (model,), namespace)

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
    version: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=64,
            pattern=r"^[a-z0-9]+$",
            description="a store version of the adapter (as a response names it); absent: the "
            "version served now",
        ),
    ] = None
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
            if self.version is not None and self.version != self._entry.version:
                self._entry = _other_version(snapshot, self._entry, self.version)
        return self

    @property
    def pinned(self) -> Any:
        """The StoreEntry (version) `name` had in the snapshot this request was validated
        against: the engine serves that version even if a reload has since changed or dropped
        the name. None for a request validated without a server (the engine looks it up)."""
        return self._entry


def _other_version(snapshot: ServedSnapshot, served: Any, version: str) -> Any:
    """Version `version` of the adapter `served` is the current version of: it must be in the
    store and made for the same base (and promoted, where only promoted versions are served).
    The engine checks its weights against the pipeline when it loads them."""
    from models.adapter import get_adapter
    from models.stages import is_production
    from models.store import StoreError

    name = served.name.removeprefix("lora-")
    try:
        entry = get_adapter(f"{name}:{version}")
    except StoreError:
        raise ValueError(
            f"adapter {name!r} has no version {version!r} in the store; this server serves "
            f"version {served.version}"
        ) from None
    if entry.metadata.get("base_hash") != served.metadata.get("base_hash"):
        raise ValueError(f"adapter {name!r} version {version!r} was made for another base")
    if snapshot.settings.promoted_only and not is_production(entry):
        raise ValueError(
            f"adapter {name!r} version {version!r} is not promoted (BENTOLORA_PROMOTED_ONLY)"
        )
    return entry


SizePair = tuple[Annotated[int, Field(ge=1, le=16384)], Annotated[int, Field(ge=1, le=16384)]]
CropPair = tuple[Annotated[int, Field(ge=0, le=16384)], Annotated[int, Field(ge=0, le=16384)]]
MICRO_CONDITIONING = (
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
)


class MicroConditioning(BaseModel):
    """SDXL's size and crop conditioning ([height, width] and [top, left], as diffusers takes
    them); absent: the pipeline's defaults (the output size, no crop)."""

    original_size: SizePair | None = None
    crops_coords_top_left: CropPair | None = None
    target_size: SizePair | None = None
    negative_original_size: SizePair | None = None
    negative_crops_coords_top_left: CropPair | None = None
    negative_target_size: SizePair | None = None

    @model_validator(mode="after")
    def negative_sizes_together(self) -> MicroConditioning:
        # diffusers uses the negative sizes only when both are given (else the positive ones)
        if (self.negative_original_size is None) != (self.negative_target_size is None):
            raise ValueError(
                "negative_original_size and negative_target_size go together: send both "
                "(or neither, and the negative side takes the positive sizes)"
            )
        return self

    def micro_conditioning(self) -> dict[str, tuple[int, int]]:
        """The fields set, as the pipeline's keyword arguments."""
        return {k: tuple(v) for k in MICRO_CONDITIONING if (v := getattr(self, k)) is not None}

    def alone_in_a_call(self) -> bool:
        """Whether this request's images must each have a text-to-image (or ControlNet)
        pipeline call of their own: with negative sizes, those diffusers pipelines lay out a
        batch's time ids as (negative, positive) pairs while the embeddings are all negatives
        then all positives, so every image after the first would take another image's
        conditioning. (The img2img and inpainting pipelines lay them out right.)"""
        return self.negative_original_size is not None


RequestDeadline = Annotated[
    float | None,
    Field(
        ge=0.1,  # not gt=0: OpenAPI 3.0 (BentoML's) has no numeric exclusiveMinimum
        le=86400,
        allow_inf_nan=False,
        description="seconds from arrival after which the server stops computing this request "
        "(its images leave the batch at the next denoising step) and answers 504; absent: the "
        "server's timeout (BENTOLORA_REQUEST_TIMEOUT_S), which also bounds it",
    ),
]


class GenerateRequest(MicroConditioning):
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
    deadline_s: RequestDeadline = None
    _received: float = PrivateAttr(default_factory=time.monotonic)
    """When the request was parsed (its arrival): the deadline counts from here."""
    _gone: Any = PrivateAttr(default=None)
    """An asyncio.Event set when the client disconnects (service.batcher attaches it)."""

    @property
    def client_gone(self) -> bool:
        """The client has disconnected: nobody will read this request's images."""
        return self._gone is not None and self._gone.is_set()

    def time_left(self, server_timeout_s: float) -> float:
        """Seconds until this request's deadline: its own `deadline_s`, or the server's timeout
        when that comes first (negative once passed)."""
        limit = (
            server_timeout_s if self.deadline_s is None else min(self.deadline_s, server_timeout_s)
        )
        return limit - (time.monotonic() - self._received)

    def unwanted(self, server_timeout_s: float) -> bool:
        """Nobody will read this request's images: its client left or its deadline passed."""
        return self.client_gone or self.time_left(server_timeout_s) < 0

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
    version: str = Field(description="the store version; send it back to pin it")
    content_hash: str = Field(description="hash of the version's files in the store")
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


# --- image modes: /img2img and /inpaint (service.image_modes) ----------------------------------

Strength = Annotated[
    float,
    Field(
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="how much of the image is redrawn: 0 keeps it (through the VAE), 1 redraws "
        "all; int(steps × strength) denoising steps run",
    ),
]
DEFAULT_STRENGTH = 0.8
JobDeadline = Annotated[
    float | None,
    Field(
        ge=1,
        le=7 * 86400,
        allow_inf_nan=False,
        description="seconds from submission after which the job stops (within a denoising "
        "step); absent: none",
    ),
]


class Img2ImgRequest(GenerateRequest):
    """/img2img: a /generate request that starts from `image` (base64 PNG/JPEG/WebP, sides
    multiples of 8). The output has the image's size: width and height default to it and, if
    sent, must equal it."""

    image: Annotated[str, Field(min_length=1, description="base64 PNG/JPEG/WebP")]
    strength: Strength = DEFAULT_STRENGTH
    _image: Any = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def size_from_the_image(cls, data: Any) -> Any:
        """width/height default to the image's (read from its header)."""
        if isinstance(data, dict) and isinstance(data.get("image"), str):
            settings = _served(cls).settings
            try:
                checked = _check_image(data["image"], settings)
            except ImageInputError as err:  # before the size checks, which would hide it
                raise ValueError(f"image: {err}") from None
            if checked.width % 8 or checked.height % 8:
                raise ValueError(
                    f"image: {checked.width}x{checked.height}; both sides must be multiples of 8 "
                    "(crop or resize it)"
                )
            data = {"width": checked.width, "height": checked.height, **data}
        return data

    @model_validator(mode="after")
    def decodable(self) -> Img2ImgRequest:
        self._image = _decoded(self, "image", self.image)
        return self


class InpaintRequest(Img2ImgRequest):
    """/inpaint: redraw where `mask` is white (an image of the same size; grey is rounded to
    black or white, as diffusers does), keep where it is black."""

    mask: Annotated[str, Field(min_length=1, description="base64 PNG/JPEG/WebP, image's size")]
    strength: Strength = 1.0
    _mask: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def mask_decodable(self) -> InpaintRequest:
        mask = _decoded(self, "mask", self.mask, check_size=False)
        if mask.size != self._image.size:
            raise ValueError(
                f"mask: {mask.width}x{mask.height}; it must be the image's size, "
                f"{self._image.width}x{self._image.height}"
            )
        self._mask = mask.convert("L")
        return self


class ControlChoice(BaseModel):
    """One ControlNet for a request: its store name, the conditioning image (edges, depth, pose
    …, of the output's aspect ratio; resized to the output's size as diffusers does) and the
    conditioning scale (0: the plain image)."""

    name: Annotated[str, Field(min_length=1, max_length=64, description="e.g. canny")]
    image: Annotated[str, Field(min_length=1, description="base64 PNG/JPEG/WebP")]
    scale: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] = 1.0

    @field_validator("name")
    @classmethod
    def in_the_store(cls, name: str) -> str:
        from models.controlnets import PREFIX, controlnet_names

        name = name.removeprefix(PREFIX)
        known = controlnet_names()
        if name not in known:
            raise ValueError(
                f"unknown ControlNet {name!r}; this server has: {', '.join(known) or 'none'} "
                "(bentolora-models import-controlnet adds one)"
            )
        return name


ASPECT_TOLERANCE = 0.05
"""How far (relative) a conditioning image's aspect ratio may be from the output's."""


MAX_CONTROLNETS = 3


class ControlNetRequest(GenerateRequest):
    """/controlnet: a /generate request that follows the structure of each of `controlnets`'
    images (several: diffusers' MultiControlNet, their residuals summed by scale)."""

    controlnets: Annotated[list[ControlChoice], Field(min_length=1, max_length=MAX_CONTROLNETS)]
    _controls: list = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def control_images(self) -> ControlNetRequest:
        names = [c.name for c in self.controlnets]
        if len(set(names)) != len(names):
            raise ValueError("controlnets: each ControlNet at most once")
        self._controls = [self._control_image(i, c.image) for i, c in enumerate(self.controlnets)]
        return self

    def _control_image(self, index: int, text: str) -> Any:
        field = f"controlnets[{index}].image"
        image = _decoded(self, field, text, check_size=False)
        want, got = self.width / self.height, image.width / image.height
        if abs(got - want) > ASPECT_TOLERANCE * want:
            raise ValueError(
                f"{field}: {image.width}x{image.height} is far from the output's "
                f"{self.width}x{self.height} (aspect ratio {got:.3g}, not {want:.3g}); send it "
                "at the output's size or aspect ratio"
            )
        return image


Handoff = Annotated[
    float,
    Field(
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="fraction of the schedule the base denoises before the refiner takes over; "
        "strictly between 0 and 1",
    ),
]


def _refiner_served(model: type[BaseModel]) -> None:
    snapshot = _served(model)
    if snapshot.loaded and not snapshot.settings.refiner:
        raise ValueError("this server has no refiner (BENTOLORA_REFINER is not set)")


class RefinedRequest(GenerateRequest):
    """/generate_with_refiner: the base (with the adapters) denoises the first `handoff` of the
    schedule and the refiner the rest (diffusers' ensemble of experts: `denoising_end` on the
    base, `denoising_start` on the refiner)."""

    handoff: Handoff = 0.8

    @field_validator("handoff")
    @classmethod
    def strictly_inside(cls, handoff: float) -> float:
        # not gt/lt: OpenAPI 3.0 (BentoML's schema) has no numeric exclusive bounds
        if handoff in (0.0, 1.0):
            raise ValueError(
                "handoff must be strictly between 0 and 1 (the base and the "
                "refiner each take part of the steps); use /generate for the base alone"
            )
        return handoff

    @model_validator(mode="after")
    def has_refiner(self) -> RefinedRequest:
        _refiner_served(type(self))
        return self


class RefineRequest(Img2ImgRequest):
    """/refine: the refiner as image-to-image on the client's image (refine after). Adapters
    are made for the base and do not apply."""

    strength: Strength = 0.3

    @model_validator(mode="after")
    def has_refiner(self) -> RefineRequest:
        if self.adapters:
            raise ValueError("adapters: the refiner takes none (they are made for the base)")
        _refiner_served(type(self))
        return self


def _check_image(text: str, settings: Any) -> Any:
    from service.images import check

    return check(text, max_bytes=settings.max_input_bytes, max_pixels=settings.max_input_pixels)


def _decoded(request: BaseModel, field: str, text: str, check_size: bool = True) -> Any:
    """`text` decoded within the input caps; a ValueError naming `field` if it is not an
    acceptable image, or (with `check_size`) not of the request's width × height (multiples
    of 8)."""
    settings = _served(type(request)).settings
    try:
        image = decode(
            text, max_bytes=settings.max_input_bytes, max_pixels=settings.max_input_pixels
        )
    except ImageInputError as err:
        raise ValueError(f"{field}: {err}") from None
    if check_size and (image.width % 8 or image.height % 8):
        raise ValueError(
            f"{field}: {image.width}x{image.height}; both sides must be multiples of 8 "
            "(crop or resize it)"
        )
    size = (request.width, request.height)  # type: ignore[attr-defined]
    if check_size and image.size != size:
        raise ValueError(
            f"{field}: {image.width}x{image.height}, but width x height is {size[0]}x{size[1]}; "
            "leave width and height out (the image's size is used) or send the image's size"
        )
    return image


def bind_image_requests(state: ServerState) -> tuple[Any, ...]:
    """The /img2img, /inpaint, /controlnet, /generate_with_refiner and /refine request models
    bound to `state`, as `bind_requests` binds /generate's."""
    choice = _bound(AdapterChoice, state)
    adapters = (Annotated[list[choice], Field(max_length=8)], [])  # type: ignore[valid-type]
    return (
        _bound(Img2ImgRequest, state, adapters=adapters),
        _bound(InpaintRequest, state, adapters=adapters),
        _bound(ControlNetRequest, state, adapters=adapters),
        _bound(RefinedRequest, state, adapters=adapters),
        _bound(RefineRequest, state, adapters=adapters),
    )

"""Images nobody will read leave a running pipeline call at its next denoising step.

A request is unwanted once its client has disconnected or its deadline has passed
(`GenerateRequest.unwanted`): its answer is a 499 or a 504 already. diffusers' SDXL pipelines
call `callback_on_step_end` after each step and take back the loop's tensors from it: latents,
prompt embeddings, pooled embeddings, time ids. `Trim` is that callback. It cuts an unwanted
image's rows from those tensors, from the scheduler's multistep history and from the per-image
generators (ancestral samplers draw noise from them), and the remaining steps compute only the
images still wanted. Each image keeps its own rows, generator and adapter set, so an image does
not change when another leaves the call. Once none is left it raises `CallAbandoned`: no further
step, no decode.

Text-to-image and img2img loops read nothing else per image, so they can drop rows (`rows=True`).
The inpainting, ControlNet and refiner loops also read per-image tensors the callback cannot
replace (masks, the initial latents, conditioning images): those calls stop only when every one
of their images is unwanted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

TENSOR_INPUTS = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]
"""What `Trim` asks the pipeline for (`callback_on_step_end_tensor_inputs`) when it drops rows."""
SCHEDULER_HISTORY = ("model_outputs", "last_sample")
"""Scheduler attributes holding per-image tensors across steps (DPM-Solver++'s and UniPC's
multistep history); the other offered schedulers keep none."""

StepCallback = Callable[[Any, int, Any, dict], dict]


class CallAbandoned(Exception):
    """Every image of a pipeline call is unwanted: the call stopped at a step."""


class Trim:
    """`callback_on_step_end` of one pipeline call over images whose requests are `requests`
    (one per image, in the call's order). `unwanted(request)` says whether an image may go;
    `generators` is the list the call was given (trimmed in place); `on_rows(kept)` is told the
    call's images that remain (indices into the original order) so the per-image adapter rows
    follow; `then` is the caller's own step callback."""

    def __init__(
        self,
        requests: Sequence[Any],
        unwanted: Callable[[Any], bool],
        *,
        rows: bool,
        generators: list | None = None,
        on_rows: Callable[[list[int]], None] | None = None,
        then: StepCallback | None = None,
    ):
        self.requests = list(requests)
        self.unwanted = unwanted
        self.rows = rows
        self.generators = generators
        self.on_rows = on_rows
        self.then = then
        self.kept = list(range(len(self.requests)))
        """The call's images still in it, as indices into `requests`."""

    @property
    def tensor_inputs(self) -> list[str]:
        return TENSOR_INPUTS if self.rows else ["latents"]

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        leaving = [j for j, i in enumerate(self.kept) if self.unwanted(self.requests[i])]
        if len(leaving) == len(self.kept):
            self.kept = []
            raise CallAbandoned
        if leaving and self.rows:  # after the last step too: the VAE decodes only the rest
            tensors = self._drop(pipe, leaving, tensors)
        return self.then(pipe, step, timestep, tensors) if self.then is not None else tensors

    def keep(self, images: Sequence[Any]) -> list[Any | None]:
        """The call's output, one entry per image of `requests` (None for an image that left)."""
        out: list[Any | None] = [None] * len(self.requests)
        for i, image in zip(self.kept, images, strict=True):
            out[i] = image
        return out

    def _drop(self, pipe: Any, leaving: list[int], tensors: dict) -> dict:
        n = len(self.kept)
        stay = sorted(set(range(n)) - set(leaving))
        log.info("%d of %d images left the call at a step boundary", len(leaving), n)
        out = {name: _rows(value, stay, n) for name, value in tensors.items()}
        scheduler = pipe.scheduler
        for name in SCHEDULER_HISTORY:
            value = getattr(scheduler, name, None)
            if isinstance(value, torch.Tensor):
                setattr(scheduler, name, _rows(value, stay, n))
            elif isinstance(value, list):
                setattr(scheduler, name, [_rows(v, stay, n) for v in value])
        if self.generators is not None and len(self.generators) == n:
            self.generators[:] = [self.generators[j] for j in stay]
        self.kept = [self.kept[j] for j in stay]
        if self.on_rows is not None:
            self.on_rows(self.kept)
        return out


def _rows(value: Any, stay: list[int], n: int) -> Any:
    """`value`'s rows of the images `stay` out of `n`: one row per image, or two under
    classifier-free guidance (the unconditional half first, as the pipeline concatenates)."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    index = torch.tensor(stay, device=value.device)
    if value.shape[0] == n:
        return value.index_select(0, index)
    if value.shape[0] == 2 * n:
        return value.index_select(0, torch.cat([index, index + n]))
    return value

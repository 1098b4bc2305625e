"""Training speed options on the UNet: which blocks recompute in the backward pass (selective
gradient checkpointing) and what torch.compile compiles."""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.utils.checkpoint
from diffusers import UNet2DConditionModel

from models.pipeline_speed import compile_unet as compile_module

log = logging.getLogger(__name__)


def unet_blocks(unet: UNet2DConditionModel) -> dict[str, torch.nn.Module]:
    """The UNet's down, mid and up blocks by module name (down_blocks.0, …, mid_block, up_blocks.N)."""
    blocks = {f"down_blocks.{i}": b for i, b in enumerate(unet.down_blocks)}
    if unet.mid_block is not None:
        blocks["mid_block"] = unet.mid_block
    blocks.update({f"up_blocks.{i}": b for i, b in enumerate(unet.up_blocks)})
    return blocks


def select_blocks(unet: UNet2DConditionModel, names: tuple[str, ...]) -> list[str]:
    """The block names that `names` (as in `checkpoint_blocks`) stand for, in UNet order."""
    blocks = list(unet_blocks(unet))
    chosen: set[str] = set()
    unknown = []
    for name in names:
        matches = [b for b in blocks if name == "all" or b == name or b.startswith(name + ".")]
        if not matches:
            unknown.append(name)
        chosen.update(matches)
    if unknown:
        raise ValueError(
            f"checkpoint_blocks: this UNet has no block {', '.join(repr(u) for u in unknown)}; "
            f"it has {', '.join(blocks)}"
        )
    return [b for b in blocks if b in chosen]


def enable_checkpointing(unet: UNet2DConditionModel, names: tuple[str, ...]) -> list[str]:
    """Gradient checkpointing in the chosen blocks only; returns their names.

    diffusers keeps a `gradient_checkpointing` flag on each down/mid/up block (it then recomputes
    the block's ResNets) and on each Transformer2DModel inside one (it then recomputes each
    transformer layer), and `enable_gradient_checkpointing` sets them all. Here it sets them all,
    which also installs the checkpoint function, then clears the flags outside the chosen blocks.
    """
    chosen = select_blocks(unet, names)
    unet.enable_gradient_checkpointing(_checkpoint)
    for name, module in unet.named_modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = any(
                name == block or name.startswith(block + ".") for block in chosen
            )
    return chosen


def _checkpoint(module: torch.nn.Module, *args: object) -> object:
    """diffusers' default checkpoint function without its torch-version check, which torch.compile
    would trace (and warn about: it is behind an lru_cache) at every checkpointed call."""
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


def checkpointed_modules(unet: torch.nn.Module) -> list[str]:
    """Names of the modules whose gradient_checkpointing flag is on (what the tests check)."""
    return [n for n, m in unet.named_modules() if getattr(m, "gradient_checkpointing", False)]


def compile_unet(unet: UNet2DConditionModel, mode: str) -> int:
    """torch.compile the UNet in place for training (models.pipeline_speed.compile_unet: off,
    blocks or unet); returns how many modules were compiled. Call it after the LoRA layers and
    checkpointing flags are set: they are traced with the module."""
    count = compile_module(unet, mode)
    if count:
        log.info("compiled %d UNet module(s) for training (%s)", count, mode)
    return count


def eager() -> contextlib.AbstractContextManager:
    """A context in which compiled modules run eager: validation and rendering, which would
    otherwise compile the UNet again (no gradients, other batch sizes) for a handful of calls.

    (`torch.compiler.set_stance` takes effect when called, so it is made here, at the `with`.)
    """
    return torch.compiler.set_stance("force_eager")

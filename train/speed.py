"""Training speed options on the UNet: which blocks recompute in the backward pass (selective
gradient checkpointing) and what torch.compile compiles."""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.utils.checkpoint
from diffusers import UNet2DConditionModel

log = logging.getLogger(__name__)

EXTRA_COMPILED_BLOCKS = ("ResnetBlock2D",)
"""Compiled by `compile: blocks` besides the UNet's own `_repeated_blocks` (diffusers names
BasicTransformerBlock): SDXL has 17 of them, where GroupNorm + SiLU fuse and the compiler
recomputes cheap pointwise results in the backward pass instead of keeping them."""


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
    """torch.compile the UNet in place for training; returns how many modules were compiled.

    `module.compile()` compiles where the module is, so no `_orig_mod.` wrapper enters the module
    tree: parameter names, the adapter file and checkpoints stay as in an eager run. Call it after
    the LoRA layers and checkpointing flags are set (they are traced with the module).
    """
    if mode == "off":
        return 0
    if mode == "unet":
        unet.compile()
        return 1
    if mode != "blocks":
        raise ValueError(f"compile: {mode!r} is not one of 'off', 'blocks', 'unet'")
    classes = set(getattr(unet, "_repeated_blocks", None) or ()) | set(EXTRA_COMPILED_BLOCKS)
    targets = [m for m in unet.modules() if type(m).__name__ in classes]
    if not targets:
        raise ValueError(f"compile: blocks found none of {sorted(classes)} in this UNet")
    # One compiled code object serves every instance of a class; each distinct shape (SDXL's
    # ResNets come in about a dozen channel/size combinations) is one more compilation of it.
    # Past the recompile limit (8) torch would quietly run the rest eager.
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, len(targets))
    for module in targets:
        module.compile()
    log.info("compiled %d UNet blocks (%s)", len(targets), ", ".join(sorted(classes)))
    return len(targets)


def eager() -> contextlib.AbstractContextManager:
    """A context in which compiled modules run eager: validation and rendering, which would
    otherwise compile the UNet again (no gradients, other batch sizes) for a handful of calls.

    (`torch.compiler.set_stance` takes effect when called, so it is made here, at the `with`.)
    """
    return torch.compiler.set_stance("force_eager")

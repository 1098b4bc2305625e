"""Speed-ups of an inference pipeline, each an option with a safe default (all off).

Applied once, after loading and before any adapter is merged (`models.lora_fusion` writes into
the fused QKV weights when those exist, so the fusing must come first):
- `fuse_qkv`: one matmul for q, k and v of each self-attention (k and v of cross-attention);
- `channels_last`: the UNet and VAE convolutions in NHWC, what tensor cores want;
- `fp8`: the UNet's linear layers in float8 through torchao (`models.float8`: `dynamic` FP8
  matmuls on compute capability ≥ 8.9, or `weight` storage only); after fusing, so the fused
  q/k/v weights are the ones quantized, and before compiling; torchao's tensor subclass breaks
  dynamo's graph under torch 2.13, so the UNet is then compiled without `fullgraph`;
- `compile`: torch.compile of the UNet, either regionally (`blocks`: each transformer and ResNet
  block on its own; the blocks share code, so compiling is a fraction of the whole UNet's time)
  or as a whole (`unet`); the UNet is compiled in place (`module.compile()`), so its modules and
  parameter names stay as they were;
- `cuda_graphs`: compiled code replayed as CUDA graphs (mode `reduce-overhead`): less launch
  overhead for small batches; one graph per input shape, so memory grows with the shapes served;
- `compile_cache`: the inductor cache folder (TORCHINDUCTOR_CACHE_DIR); on a persistent volume,
  a restarted server reuses the compiled kernels instead of compiling again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "blocks", "unet")
FP8_MODES = ("off", "dynamic", "weight")
EXTRA_BLOCK_CLASSES = ("ResnetBlock2D",)
"""What `blocks` compiles besides the UNet's `_repeated_blocks` (diffusers names
BasicTransformerBlock): the ResNet blocks, which carry the convolutions and GroupNorm + SiLU."""
RECOMPILE_LIMIT = 64
"""Compiled variants kept per code object: blocks of several widths and a few batch sizes and
image sizes each need their own (torch's default of 8 would quietly run the rest eager)."""


@dataclass(frozen=True)
class SpeedOptions:
    compile: str = "off"
    """off, blocks (regional torch.compile of the UNet's repeated blocks) or unet (all of it)."""
    cuda_graphs: bool = False
    """Replay the compiled UNet as CUDA graphs (needs compile and a CUDA device)."""
    channels_last: bool = False
    """UNet and VAE in channels-last memory format."""
    fuse_qkv: bool = False
    """Fused q/k/v projections in the UNet's and VAE's attention."""
    compile_cache: str = ""
    """Inductor cache folder (TORCHINDUCTOR_CACHE_DIR); empty: torch's default under /tmp."""
    fp8: str = "off"
    """off, dynamic (float8 weights and activations: FP8 matmuls, CUDA capability ≥ 8.9) or
    weight (float8 weights, bf16 matmuls: half the memory of the UNet's linear weights)."""

    def __post_init__(self) -> None:
        problems = []
        if self.compile not in COMPILE_MODES:
            problems.append(f"compile={self.compile!r} is not one of {', '.join(COMPILE_MODES)}")
        if self.fp8 not in FP8_MODES:
            problems.append(f"fp8={self.fp8!r} is not one of {', '.join(FP8_MODES)}")
        if self.cuda_graphs and self.compile == "off":
            problems.append("cuda_graphs needs compile (blocks or unet)")
        if problems:
            raise ValueError("; ".join(problems))

    def compile_mode(self) -> str:
        # Not max-autotune: its GEMM search makes the first compile minutes long.
        return "reduce-overhead" if self.cuda_graphs else "default"

    def describe(self) -> str:
        on = [
            name
            for name, value in (
                ("fuse_qkv", self.fuse_qkv),
                ("channels_last", self.channels_last),
                (f"fp8={self.fp8}", self.fp8 != "off"),
                (f"compile={self.compile}", self.compile != "off"),
                ("cuda_graphs", self.cuda_graphs),
            )
            if value
        ]
        return ", ".join(on) or "none"


def speed_up(pipe, options: SpeedOptions, device: str) -> int:
    """Apply `options` to `pipe` in place (see the module docstring for the order). Returns the
    recompile limit the compiled UNet needs (0 when not compiled): give it to `model_calls` in
    every thread that runs the pipeline."""
    import torch

    from models.float8 import quantize_unet, why_not

    if options.cuda_graphs and not device.startswith("cuda"):
        raise ValueError(f"cuda_graphs needs a CUDA device, not {device!r}")
    fp8_problem = why_not(options.fp8, device, pipe.unet.dtype)
    if fp8_problem:
        raise ValueError(fp8_problem)
    if options.fuse_qkv:
        pipe.fuse_qkv_projections()
    if options.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if options.fp8 != "off":
        quantize_unet(pipe.unet, options.fp8, device)
    if options.compile == "off":
        return 0
    if options.compile_cache:
        os.makedirs(options.compile_cache, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = options.compile_cache
    fullgraph = options.fp8 == "off"
    count = compile_unet(
        pipe.unet, options.compile, fullgraph=fullgraph, mode=options.compile_mode()
    )
    log.info("compiled %d UNet module(s) (%s, %s)", count, options.compile, options.compile_mode())
    return recompile_limit(count)


def recompile_limit(compiled_modules: int) -> int:
    return max(compiled_modules, RECOMPILE_LIMIT)


def model_calls(limit: int):
    """A context for running a compiled model in the calling thread: dynamo's recompile limit
    at `limit` (torch keeps config overrides per thread since 2.12, so the limit set where the
    model was compiled does not reach a server's worker threads, which would stop at torch's 8
    variants per block); nothing when `limit` is 0."""
    import contextlib

    import torch

    if not limit:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(recompile_limit=limit)


def compile_unet(unet, which: str, **compile_kwargs) -> int:
    """torch.compile `unet` in place (`module.compile()`: no `_orig_mod.` wrapper enters the
    module tree, so parameter names, adapter files and checkpoints stay as in an eager run):
    off, blocks (each repeated block on its own; one compiled code object serves every instance
    of a class, once per shape) or unet; `compile_kwargs` go to torch.compile. Returns how
    many modules were compiled."""
    import torch

    if which not in COMPILE_MODES:
        raise ValueError(f"compile: {which!r} is not one of {', '.join(COMPILE_MODES)}")
    if which == "off":
        return 0
    if which == "unet":
        unet.compile(**compile_kwargs)
        return 1
    classes = set(getattr(unet, "_repeated_blocks", None) or ()) | set(EXTRA_BLOCK_CLASSES)
    targets = [m for m in unet.modules() if type(m).__name__ in classes]
    if not targets:
        raise ValueError(f"compile: blocks found none of {sorted(classes)} in this UNet")
    dynamo = torch._dynamo.config  # this thread's (see model_calls for the others)
    dynamo.recompile_limit = max(dynamo.recompile_limit, recompile_limit(len(targets)))
    for module in targets:
        module.compile(**compile_kwargs)
    return len(targets)

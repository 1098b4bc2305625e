"""Speed-ups of an inference pipeline, each an option with a safe default (all off).

Applied once, after loading and before any adapter is merged (`models.lora_fusion` writes into
the fused QKV weights when those exist, so the fusing must come first):
- `fuse_qkv`: one matmul for q, k and v of each self-attention (k and v of cross-attention);
- `channels_last`: the UNet and VAE convolutions in NHWC, what tensor cores want;
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
BLOCK_CLASSES = ("BasicTransformerBlock", "ResnetBlock2D")
"""What `blocks` compiles: the UNet's repeated units (diffusers names the first in
`UNet2DConditionModel._repeated_blocks`; the ResNet blocks carry the convolutions)."""
RECOMPILE_LIMIT = 64
"""Compiled variants kept per code object: blocks of several widths and a few batch sizes and
image sizes each need their own (torch's default of 8 would fall back to eager past it)."""


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

    def __post_init__(self) -> None:
        problems = []
        if self.compile not in COMPILE_MODES:
            problems.append(f"compile={self.compile!r} is not one of {', '.join(COMPILE_MODES)}")
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
                (f"compile={self.compile}", self.compile != "off"),
                ("cuda_graphs", self.cuda_graphs),
            )
            if value
        ]
        return ", ".join(on) or "none"


def speed_up(pipe, options: SpeedOptions, device: str) -> None:
    """Apply `options` to `pipe` in place (see the module docstring for the order)."""
    import torch

    if options.cuda_graphs and not device.startswith("cuda"):
        raise ValueError(f"cuda_graphs needs a CUDA device, not {device!r}")
    if options.fuse_qkv:
        pipe.fuse_qkv_projections()
    if options.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if options.compile == "off":
        return
    if options.compile_cache:
        os.makedirs(options.compile_cache, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = options.compile_cache
    torch._dynamo.config.recompile_limit = max(
        torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT
    )
    kwargs = {"fullgraph": True, "mode": options.compile_mode()}
    if options.compile == "unet":
        pipe.unet.compile(**kwargs)
        return
    blocks = [m for m in pipe.unet.modules() if type(m).__name__ in BLOCK_CLASSES]
    for block in blocks:
        block.compile(**kwargs)
    log.info("compiling %d UNet blocks (%s)", len(blocks), options.compile_mode())

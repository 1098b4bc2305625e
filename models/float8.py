"""FP8 (float8 e4m3) UNet linear layers through torchao: the `fp8` speed option.

Two modes, both on the UNet's `nn.Linear` layers only (convolutions, norms, the VAE and the text
encoders stay in the pipeline's dtype), both with one scale per output row:
- `dynamic`: weights and activations in float8, each matmul a scaled FP8 GEMM (`torch._scaled_mm`);
  twice the bf16 tensor-core rate, on CUDA devices of compute capability 8.9 or more (Ada,
  Hopper, Blackwell);
- `weight`: weights stored in float8 and dequantized for a bf16 matmul: half the UNet's linear
  weight memory, no speed-up (a little slower); it runs on any device.

LoRA stays merged in place (`models.lora_fusion`): a layer's weight is a torchao `Float8Tensor`
whose `qdata` (float8) and `scale` (float32, one per row) rows are written in place, so modules,
parameters and compiled code stay as they are. The merge reads the base back from its float8
rows (`dequantize_rows`), adds the adapters' terms in float32 and quantizes each row again
(`quantize_rows`): one rounding to float8 per switch, never an accumulation, since the base rows
are kept. Restoring the base copies its kept float8 rows back bit for bit.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

ALIGNMENT = 16
"""`torch._scaled_mm` needs both matrix dimensions to be multiples of 16: smaller or odd layers
(none in SDXL's UNet) stay in the pipeline's dtype."""
MIN_CAPABILITY = (8, 9)


def why_not(mode: str, device: str, dtype: torch.dtype) -> str | None:
    """Why `mode` cannot run on `device` with weights in `dtype` (None: it can)."""
    if mode != "dynamic":
        return None
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return f"fp8=dynamic needs a CUDA device of compute capability ≥ 8.9, not {device!r}"
    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < MIN_CAPABILITY:
        return (
            f"fp8=dynamic needs compute capability ≥ 8.9 (Ada, Hopper or newer); {device} has "
            f"{capability[0]}.{capability[1]}: use fp8=weight or off"
        )
    if dtype != torch.bfloat16:  # torchao's row-wise FP8 matmul takes bfloat16 only
        return f"fp8=dynamic needs bfloat16 weights, not {dtype}"
    return None


def quantize_unet(unet: nn.Module, mode: str, device: str) -> int:
    """Quantize the UNet's eligible linear layers in place (`mode` dynamic or weight). Returns
    how many were quantized. Raises ValueError if the device cannot run `mode`, RuntimeError if
    torchao is not installed."""
    if mode not in ("dynamic", "weight"):
        raise ValueError(f"fp8={mode!r}: quantize_unet takes one of dynamic, weight")
    problem = why_not(mode, device, unet.dtype)
    if problem:
        raise ValueError(problem)
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            PerRow,
            quantize_,
        )
    except ImportError as error:
        raise RuntimeError(
            "fp8 needs torchao: pip install 'bentolora[fp8]' (or torchao)"
        ) from error
    if mode == "dynamic":
        config = Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow(), set_inductor_config=False
        )
    else:
        config = Float8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False)
    eligible = [name for name, module in unet.named_modules() if _eligible(module)]
    quantize_(unet, config, filter_fn=lambda module, _: _eligible(module))
    log.info("fp8=%s: %d UNet linear layers in float8", mode, len(eligible))
    return len(eligible)


def _eligible(module: nn.Module) -> bool:
    return (
        type(module) is nn.Linear
        and not is_float8(module.weight)
        and module.in_features % ALIGNMENT == 0
        and module.out_features % ALIGNMENT == 0
    )


def is_float8(weight: torch.Tensor) -> bool:
    """Whether `weight` is a torchao float8 tensor (its data in `qdata`, its row scales in
    `scale`)."""
    return hasattr(weight, "qdata") and hasattr(weight, "scale")


def parts(weight: torch.Tensor, rows: slice) -> tuple[torch.Tensor, ...]:
    """The tensors that hold `weight[rows]`, as views one can write into: the rows of `qdata`
    and of `scale` for a float8 weight, else the rows themselves."""
    if not is_float8(weight):
        return (weight[rows],)
    if weight.scale.shape != (weight.shape[0], 1):
        raise ValueError(f"float8 weight with scale {tuple(weight.scale.shape)}: not one per row")
    return weight.qdata[rows], weight.scale[rows]


def dequantize_rows(qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 values of float8 rows (`qdata` × its row's `scale`)."""
    return qdata.float() * scale


def quantize_rows(values: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`values` (…, rows, columns; float32) rounded to `dtype` (the pipeline's dtype, as the
    weight was before quantizing) and quantized with one scale per row, as torchao quantized the
    weights: (qdata, scale)."""
    from torchao.quantization import Float8Tensor, PerRow

    quantized = Float8Tensor.from_hp(values.to(dtype), granularity=PerRow())
    return quantized.qdata, quantized.scale

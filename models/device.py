"""Where models run and in which precision, when a user or a config says "auto"."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    """`bfloat16` -> torch.bfloat16, with an error naming the allowed values."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}") from None


def resolve_device(name: str = "auto") -> str:
    """`auto`: cuda when a CUDA device is present, else cpu; any other name as given."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`auto`: bfloat16 on CUDA, float32 elsewhere; any other name parsed."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return parse_dtype(name)

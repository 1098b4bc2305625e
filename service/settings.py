"""Service configuration from the environment (or a .env the deployment sets), checked at start."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Settings:
    base: str = "sdxl-tiny"
    """BENTOLORA_BASE: store tag of the SDXL base to serve."""
    clip: str = "clip-tiny"
    """BENTOLORA_CLIP: store tag of the CLIP model behind /score."""
    device: str = "auto"
    """BENTOLORA_DEVICE: cuda, cpu, or auto (cuda when present)."""
    dtype: str = "auto"
    """BENTOLORA_DTYPE: float32, float16, bfloat16, or auto (bfloat16 on cuda, float32 on cpu)."""
    max_batch_images: int = 8
    """BENTOLORA_MAX_BATCH_IMAGES: images in one pipeline call at most."""
    max_pixels: int = 2048 * 2048
    """BENTOLORA_MAX_PIXELS: width × height of a generated image at most."""
    max_input_bytes: int = 8 * 2**20
    """BENTOLORA_MAX_INPUT_BYTES: size of one image sent to /score at most."""
    max_input_pixels: int = 4096 * 4096
    """BENTOLORA_MAX_INPUT_PIXELS: pixels of one image sent to /score at most (decompression bombs)."""

    def __post_init__(self) -> None:
        problems = []
        if self.dtype not in DTYPES:
            problems.append(f"BENTOLORA_DTYPE={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            problems.append(f"BENTOLORA_DEVICE={self.device!r} is not auto, cpu, cuda or cuda:N")
        for name in ("max_batch_images", "max_pixels", "max_input_bytes", "max_input_pixels"):
            if getattr(self, name) < 1:
                problems.append(
                    f"BENTOLORA_{name.upper()}={getattr(self, name)} must be at least 1"
                )
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        values = {}
        for f in fields(cls):
            raw = env.get(f"BENTOLORA_{f.name.upper()}")
            if raw is not None:
                try:
                    values[f.name] = int(raw) if f.type == "int" else raw
                except ValueError:
                    raise ValueError(
                        f"BENTOLORA_{f.name.upper()}={raw!r} is not an integer"
                    ) from None
        return cls(**values)

    def torch_device(self) -> str:
        import torch

        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def torch_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().startswith("cuda") else torch.float32
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
            self.dtype
        ]

"""Timing, memory, FLOP and image-difference helpers shared by the benchmark sections."""

from __future__ import annotations

import math
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Row:
    """One line of the results table."""

    section: str
    """serve, http or train."""
    name: str
    images: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    """Seconds per call (per request over HTTP)."""
    warmup_s: float = float("nan")
    """The first call (or cold start to ready, over HTTP), not counted in the figures."""
    peak_memory_gb: float = float("nan")
    memory_kind: str = ""
    flops_per_image: float = float("nan")
    baseline: str = ""
    """Name of the row this one's ratio is taken against."""
    ratio: float = float("nan")
    """images/s of this row over images/s of `baseline`."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    def latency(self, q: float) -> float:
        return percentile(self.latencies, q)

    def tflops(self) -> float:
        return self.flops_per_image * self.images_per_s / 1e12

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            images_per_s=self.images_per_s,
            p50_s=self.latency(50),
            p95_s=self.latency(95),
            achieved_tflops=self.tflops(),
        )
        return data


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> tuple[float, str]:
    """(GiB, what it is): the allocator's peak since reset_peak on CUDA; the process's peak RSS
    on a CPU, which only ever grows, so on a CPU it bounds every row measured so far."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"


def timed_calls(
    call: Callable[[], Any], *, repeats: int, device: str
) -> tuple[float, list[float], float]:
    """(warm-up seconds, per-call seconds, total seconds) of one warm-up call then `repeats`."""
    started = time.perf_counter()
    call()
    sync(device)
    warmup = time.perf_counter() - started
    latencies = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        sync(device)
        latencies.append(time.perf_counter() - t0)
    return warmup, latencies, sum(latencies)


def measure_row(
    row: Row, call: Callable[[], Any], *, repeats: int, images_per_call: int, device: str
) -> Row:
    reset_peak(device)
    row.warmup_s, row.latencies, row.seconds = timed_calls(call, repeats=repeats, device=device)
    row.images = repeats * images_per_call
    row.peak_memory_gb, row.memory_kind = peak_memory(device)
    return row


def image_flops(pipe, *, size: int, steps: int, guidance: float) -> dict[str, float]:
    """FLOPs of one image: a UNet forward (batch 1) × steps × 2 with CFG, plus one VAE decode.

    Counted by models.flops on shape-only copies, so the figure is the same on every device.
    """
    from models.flops import unet_forward_flops, vae_decode_flops

    latent = size // pipe.vae_scale_factor
    unet_flops = unet_forward_flops(pipe.unet, batch=1, height=latent, width=latent)
    decode_flops = vae_decode_flops(pipe.vae, batch=1, height=latent, width=latent)
    passes = 2 if guidance > 1 else 1
    return {
        "unet_forward": float(unet_flops),
        "vae_decode": float(decode_flops),
        "per_image": float(unet_flops * steps * passes + decode_flops),
    }


def image_diff(a, b) -> dict[str, float]:
    """Max absolute difference (0-255) and PSNR (dB) between two lists of PIL images."""
    x = np.stack([np.asarray(i.convert("RGB"), dtype=np.float64) for i in a])
    y = np.stack([np.asarray(i.convert("RGB"), dtype=np.float64) for i in b])
    mse = float(np.mean((x - y) ** 2))
    psnr = float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return {"max_abs_diff": float(np.max(np.abs(x - y))), "psnr_db": psnr}

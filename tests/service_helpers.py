"""Starting a real `bentoml serve` on loopback for the service tests, and reading its images."""

from __future__ import annotations

import base64
import io
import os
import subprocess
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from service import launch
from service.launch import free_port

__all__ = [
    "free_port",
    "pixels",
    "rss_mb",
    "server_env",
    "start_server",
    "stop_server",
    "worker_processes",
]


def start_server(
    env: dict[str, str], log_path: Path, timeout_s: float = 180
) -> tuple[subprocess.Popen, str]:
    proc, url, _ = launch.start(env, log_path, timeout_s)
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    launch.stop(proc)


def pixels(image: Image.Image | str) -> np.ndarray:
    if isinstance(image, str):
        image = Image.open(io.BytesIO(base64.b64decode(image)))
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def response_pixels(response) -> list[np.ndarray]:
    """The images of one engine response (`service.schemas.GenerateResponse`), as arrays."""
    return [pixels(image.image) for image in response.images]


def server_env() -> dict[str, str]:
    return {
        **os.environ,
        "BENTOLORA_BASE": "sdxl-tiny",
        "BENTOLORA_CLIP": "clip-tiny",
        "BENTOLORA_DEVICE": "cpu",
        "BENTOLORA_MAX_PIXELS": str(256 * 256),
    }


def worker_processes(server_pid: int) -> list[psutil.Process]:
    """The server's BentoML worker processes (the ones running the service)."""
    workers = []
    for p in psutil.Process(server_pid).children(recursive=True):
        try:
            if "_bentoml_impl.worker" in " ".join(p.cmdline()):
                workers.append(p)
        except psutil.Error:  # exited, or a zombie not yet reaped
            pass
    return workers


def rss_mb(server_pid: int) -> float:
    """Resident memory of the server and all its processes (arbiter, workers), in MiB."""
    total = 0
    for p in [psutil.Process(server_pid), *psutil.Process(server_pid).children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20

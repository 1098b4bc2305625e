"""Starting a real `bentoml serve` on loopback for the service tests, and reading its images."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    env: dict[str, str], log_path: Path, timeout_s: float = 180
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            "service.service:SDXLLoRA",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server not ready in {timeout_s}s: {log_path.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def pixels(image: Image.Image | str) -> np.ndarray:
    if isinstance(image, str):
        image = Image.open(io.BytesIO(base64.b64decode(image)))
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def server_env() -> dict[str, str]:
    return {
        **os.environ,
        "BENTOLORA_BASE": "sdxl-tiny",
        "BENTOLORA_CLIP": "clip-tiny",
        "BENTOLORA_DEVICE": "cpu",
        "BENTOLORA_MAX_PIXELS": str(256 * 256),
    }

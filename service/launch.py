"""Start this service with `bentoml serve` in a child process and wait until it is ready.

Used where a real server on loopback is needed from Python: the tests and the benchmark.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "service.service:SDXLLoRA"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    env: dict[str, str], log_path: Path, timeout_s: float = 180
) -> tuple[subprocess.Popen, str, float]:
    """(process, url, seconds until /readyz answered 200); the server's output goes to
    `log_path`, whose tail is in the error if the server exits or is not ready in time."""
    port = free_port()
    command = [sys.executable, "-m", "bentoml", "serve", SERVICE]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {Path(log_path).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                if response.status == 200:
                    return proc, url, time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.25)
    stop(proc)
    raise RuntimeError(
        f"server not ready in {timeout_s:.0f} s: {Path(log_path).read_text()[-3000:]}"
    )


def stop(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM (BentoML finishes in-flight requests), then SIGKILL past `timeout_s`."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

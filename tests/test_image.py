"""The OCI image really builds, runs as non-root and serves (buildah, no daemon, no registry)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from service.client import Client
from tests.service_helpers import free_port
from tools import lock

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
TAG = "localhost/bentolora:tiny"
TOOLS = ("buildah", "debootstrap", "skopeo")


@pytest.fixture(scope="module")
def image(tiny_base, tmp_path_factory):
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail(f"CI must be able to build the image: missing {missing} or not root")
        pytest.skip(f"building images needs root and {', '.join(TOOLS)} (tools/system-deps.sh)")
    out = tmp_path_factory.mktemp("image")
    env = {**os.environ, "BENTOLORA_IMAGE_OUT": str(out)}
    started = time.time()
    result = subprocess.run(
        ["bash", "deploy/build-image.sh", TAG],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    print(f"image built in {time.time() - started:.0f}s")
    return out


def test_archive_is_a_valid_oci_image_running_as_non_root(image):
    config = json.loads((image / "config.json").read_text())
    assert config["config"]["User"] == "bentoml"
    assert "3000/tcp" in config["config"]["ExposedPorts"]
    env = dict(item.split("=", 1) for item in config["config"]["Env"])
    assert env["BENTOLORA_BASE"] == "sdxl-tiny" and env["BENTOLORA_DEVICE"] == "cpu"
    inspect = json.loads((image / "inspect.json").read_text())
    assert inspect["Os"] == "linux" and inspect["Architecture"] == "amd64" and inspect["Layers"]
    size_mb = (image / "bentolora-tiny.oci.tar").stat().st_size / 2**20
    print(f"OCI archive: {size_mb:.0f} MiB")


def test_image_has_no_compilers(image):
    ctr = subprocess.run(
        ["buildah", "from", TAG], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        probe = subprocess.run(
            [
                "buildah",
                "run",
                "--isolation",
                "chroot",
                ctr,
                "--",
                "sh",
                "-c",
                "for t in gcc cc make g++ ld; do command -v $t && exit 1; done; id -un",
            ],
            capture_output=True,
            text=True,
        )
        assert probe.returncode == 0, probe.stdout + probe.stderr
        assert probe.stdout.strip() == "bentoml"
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True)


def test_the_image_holds_the_locked_runtime_set(image):
    """The image's venv has exactly requirements/runtime.txt's versions (torch as its CPU build)."""
    ctr = subprocess.run(
        ["buildah", "from", TAG], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        probe = subprocess.run(
            ["buildah", "run", "--isolation", "chroot", ctr, "--", "/app/.venv/bin/python", "-c"]
            + [lock.READ_ENVIRONMENT, "bentolora"],
            capture_output=True,
            text=True,
        )
        assert probe.returncode == 0, probe.stderr[-3000:]
        installed = json.loads(probe.stdout)["installed"]
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True)
    assert installed["torch"].endswith("+cpu")
    problems, notes = lock.compare(lock.read_lock(lock.RUNTIME), installed)
    assert problems == [], "\n".join(problems)
    assert notes == [], "\n".join(notes)


def test_the_image_serves_generate_and_score(image):
    port = free_port()
    ctr = subprocess.run(
        ["buildah", "from", TAG], capture_output=True, text=True, check=True
    ).stdout.strip()
    server = subprocess.Popen(
        [
            "buildah",
            "run",
            "--isolation",
            "chroot",
            "--network",
            "host",
            ctr,
            "--",
            "/home/bentoml/bento/env/docker/entrypoint.sh",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            try:
                if urllib.request.urlopen(url + "/readyz", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
        with Client(url, timeout=120) as client:
            [generated] = client.generate(
                "a red circle", width=64, height=64, steps=4, seed=1, adapters={"quickstart": 1.0}
            )
            assert generated.image.size == (64, 64)
            assert generated.adapters[0]["name"] == "quickstart"
            scores = client.score([generated.image, Image.new("RGB", (64, 64))], ["a red circle"])
            assert len(scores.clip_scores) == 2 and scores.image_similarity[0][0] > 0.999
        # The web UI ships in the image too (gradio is a dependency of the project wheel).
        with urllib.request.urlopen(url + "/ui/", timeout=30) as page:
            assert page.status == 200 and b"gradio" in page.read().lower()
    finally:
        # `buildah run` (chroot isolation) does not take the container's processes down with it,
        # so the server's worker would outlive the test: note them all before stopping.
        inside = descendants(server.pid)
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        for pid in inside:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["buildah", "rm", ctr], capture_output=True)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` now (children, their children, ...)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_production_bentofile_builds_with_stand_in_weights(tmp_path):
    """bentofile.yaml (CUDA flavour) is a valid build: tiny weights under the production names
    stand in for SDXL and CLIP ViT-L/14, which cannot be downloaded here."""
    home = tmp_path / "home"
    env = {**os.environ, "BENTOML_HOME": str(home)}
    setup = """
import torch
from models.adapter import AdapterInfo, save_adapter
from models.bases import save_base
from models.clip import build_tiny_clip, save_clip
from models.tiny import build_tiny_pipeline
base = save_base(build_tiny_pipeline(0), "sdxl-base", source="stand-in")
save_clip(*build_tiny_clip(0), "clip-l", source="stand-in")
layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
save_adapter("my-style", {"unet": {layer + ".lora_A.weight": torch.zeros(2, 64),
                                   layer + ".lora_B.weight": torch.zeros(64, 2)}},
             AdapterInfo(base_tag=base.tag, base_hash=base.metadata["content_hash"], rank=2, alpha=2.0,
                         dropout=0.0, target_modules=["to_q"], text_encoder_lora=False))
"""
    subprocess.run(
        [sys.executable, "-c", setup], cwd=ROOT, env=env, check=True, capture_output=True
    )
    wheels = ROOT / "build" / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), "."],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-f", "bentofile.yaml", "--output", "tag", "."],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento = home / "bentos" / name / version
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert (
        "cuda"
        in dockerfile.splitlines()[
            [i for i, line in enumerate(dockerfile.splitlines()) if line.startswith("FROM")][0]
        ].lower()
    )
    # the image installs the locked run-time set, not whatever the ranges resolve to that day
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    for name, version in lock.read_lock(lock.RUNTIME).items():
        assert f"{name}=={version}" in requirements
    manifest = (bento / "bento.yaml").read_text()
    for model in ("sdxl-base", "clip-l", "lora-my-style"):
        assert model in manifest

"""The OCI image really builds, runs as non-root and serves (buildah, no daemon, no registry)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from service.client import Client
from tests.service_helpers import free_port

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
        pytest.skip(f"building images needs root and {', '.join(TOOLS)} (.ci/run installs them)")
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
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        subprocess.run(["buildah", "rm", ctr], capture_output=True)

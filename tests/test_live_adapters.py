"""Live registration against a real server (issue 16, item 3): an adapter saved to the store after
the start is served by the store watcher with no admin call; the admin routes upload a kohya file
(served at once, generates), unload and deny adapters (refused with the reason, through the
watcher's re-reads) and refuse bad input with a 4xx that stores nothing. One `bentoml serve` on
loopback with the tiny models, on a CPU."""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
import torch

from models.adapter import list_adapters
from models.clip import build_tiny_clip, save_clip
from models.lora_exchange import base_layers
from service.adapter_policy import deny_file
from tests.service_helpers import pixels, server_env, start_server, stop_server
from tests.store_helpers import bentoml_models, one_layer_adapter
from tests.test_lora_files import UNIFORM, lycoris_file, random_factors, write_kohya

pytestmark = pytest.mark.slow

TOKEN = "client-secret"
ADMIN_TOKEN = "admin-secret"
USER = {"Authorization": f"Bearer {TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WATCH_S = 1
MAX_ADAPTER_BYTES = 400_000
SMALL = {"width": 64, "height": 64, "steps": 4, "guidance": 5.0}
UPLOAD = "/adapters/upload"
RAW = ADMIN | {"Content-Type": "application/octet-stream"}


def raw(content: bytes, headers: dict = RAW, **params) -> dict:
    """httpx arguments of an upload with the file as the body."""
    return {"params": params, "content": content, "headers": headers}


def admin_json(body) -> dict:
    return {"json": body, "headers": ADMIN}


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    save_clip(*build_tiny_clip(0), "clip-tiny", source="tiny:seed=0")
    env = server_env() | {
        "BENTOLORA_TOKEN": TOKEN,
        "BENTOLORA_ADMIN_TOKEN": ADMIN_TOKEN,
        "BENTOLORA_ADAPTER_WATCH_S": str(WATCH_S),
        "BENTOLORA_MAX_ADAPTER_BYTES": str(MAX_ADAPTER_BYTES),
        "BENTOLORA_UI": "0",
    }
    proc, url = start_server(env, tmp / "server.log")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def kohya_bytes(tiny_base, tmp_path_factory) -> bytes:
    """A kohya/A1111 file for the tiny base, written from kohya's key naming (tests/
    test_lora_files.py): UNet attention, a convolution, both text encoders."""
    path = tmp_path_factory.mktemp("kohya") / "style.safetensors"
    write_kohya(path, random_factors(base_layers(tiny_base), UNIFORM, seed=3))
    return path.read_bytes()


def generate(http, headers=USER, **fields) -> httpx.Response:
    body = {"requests": [{"prompt": "a red square", "seed": 7, **SMALL, **fields}]}
    return http.post("/generate", json=body, headers=headers)


def listing(http) -> dict:
    response = http.get("/adapters/", headers=USER)
    assert response.status_code == 200, response.text
    return response.json()


def served_versions(http) -> dict[str, str]:
    return {row["name"]: row["version"] for row in listing(http)["adapters"]}


def wait_until(condition, what: str, within_s: float = WATCH_S + 10) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {within_s} s"
        time.sleep(0.2)


def watcher_cycle(http, tiny_base, name: str) -> None:
    """Save an unrelated adapter and wait until the watcher serves it: a re-selection ran."""
    entry = one_layer_adapter(name, tiny_base)
    wait_until(lambda: served_versions(http).get(name) == entry.version, f"{name} served")


def test_an_adapter_saved_after_the_start_is_served_within_the_interval(http, tiny_base):
    assert generate(http, adapters=[{"name": "late"}]).status_code == 400
    entry = one_layer_adapter("late", tiny_base, value=0.05)
    saved = time.monotonic()
    wait_until(lambda: served_versions(http).get("late") == entry.version, "late served")
    assert time.monotonic() - saved < WATCH_S + 5  # one interval and a selection, no admin call
    response = generate(http, adapters=[{"name": "late"}])
    assert response.status_code == 200, response.text
    assert response.json()[0]["images"][0]["adapters"][0]["version"] == entry.version


def test_an_uploaded_kohya_file_is_stored_with_its_origin_served_at_once_and_generates(
    http, kohya_bytes
):
    response = http.post(UPLOAD, **raw(kohya_bytes, name="uploaded", filename="style.safetensors"))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["served"] is True and body["tag"].startswith("lora-uploaded:")
    assert body["origin"]["format"] == "kohya" and body["origin"]["file"] == "style.safetensors"
    [entry] = [e for e in list_adapters() if e.tag == body["tag"]]
    assert entry.metadata["origin"]["sha256"] == body["origin"]["sha256"]
    assert served_versions(http)["uploaded"] == body["version"]  # no wait, no reload

    base = generate(http).json()[0]["images"][0]
    styled = generate(http, adapters=[{"name": "uploaded"}])
    assert styled.status_code == 200, styled.text
    image = styled.json()[0]["images"][0]
    assert image["adapters"][0]["version"] == body["version"]
    assert np.abs(pixels(image["image"]) - pixels(base["image"])).max() > 0  # it takes effect

    form = http.post(
        "/adapters/upload",
        data={"name": "uploaded-form"},
        files={"file": ("from-a-form.safetensors", kohya_bytes, "application/octet-stream")},
        headers=ADMIN,
    )
    assert form.status_code == 201, form.text
    assert form.json()["origin"]["file"] == "from-a-form.safetensors"
    assert generate(http, adapters=[{"name": "uploaded-form"}]).status_code == 200


def bad_calls(kohya: bytes, tmp_path) -> list[tuple[str, dict, int, str]]:
    """(path, httpx arguments, status, part of the reason) of each bad admin call."""
    pickled = io.BytesIO()
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, pickled)
    loha = lycoris_file(tmp_path / "loha.safetensors", "loha").read_bytes()
    foreign = tmp_path / "foreign.safetensors"  # a layer the tiny base does not have
    write_kohya(foreign, {("unet", "down_blocks.9.to_q"): (torch.ones(2, 8), torch.ones(8, 2), 2)})
    big = b"\0" * (MAX_ADAPTER_BYTES + 1)
    form = {"data": {"name": "form"}, "files": {"other": ("a.safetensors", kohya)}}
    return [
        (UPLOAD, raw(kohya, headers={}, name="x"), 401, "needs the admin token"),
        (UPLOAD, raw(kohya, headers=USER, name="x"), 403, "needs the admin token"),
        (UPLOAD, raw(kohya), 400, "name the adapter"),
        (UPLOAD, raw(kohya, name="Bad Name!"), 400, "is not allowed"),
        (UPLOAD, raw(pickled.getvalue(), name="pickled"), 400, "not a safetensors file"),
        (UPLOAD, raw(kohya, name="ckpt", filename="a.ckpt"), 400, "only .safetensors"),
        (UPLOAD, {**form, "headers": ADMIN}, 400, "no `file` field"),
        (UPLOAD, raw(big, name="big"), 413, "BENTOLORA_MAX_ADAPTER_BYTES"),
        (UPLOAD, raw(big * 2, name="huge"), 413, "request body is over"),
        (UPLOAD, raw(loha, name="loha"), 422, "LyCORIS LoHa"),
        (UPLOAD, raw(foreign.read_bytes(), name="foreign"), 422, "are not layers of base"),
        ("/adapters/unload", admin_json({"name": "nope"}), 404, "unknown adapter 'nope'"),
        ("/adapters/deny", admin_json({"name": "nope"}), 404, "no adapter 'nope'"),
        ("/adapters/deny", admin_json({"name": "late", "version": "v0"}), 404, "no version 'v0'"),
        ("/adapters/allow", admin_json({"name": "late"}), 404, "neither denied nor unloaded"),
        ("/adapters/deny", {"content": b"{not json", "headers": ADMIN}, 400, "send JSON"),
        ("/adapters/deny", admin_json({"version": "x"}), 400, "name the adapter"),
    ]


def test_bad_admin_calls_get_their_4xx_with_a_reason_and_store_nothing(http, kohya_bytes, tmp_path):
    before_cli = {m["tag"] for m in bentoml_models("list")}
    before = {e.tag for e in list_adapters()}
    denied_before = deny_file().read_bytes() if deny_file().exists() else None
    served_before = served_versions(http)
    for path, arguments, status, reason in bad_calls(kohya_bytes, tmp_path):
        response = http.post(path, **arguments)
        assert response.status_code == status, (path, arguments.get("params"), response.text)
        message = response.json()["error"]
        assert reason in message and "\n" not in message, (path, message)
    assert {e.tag for e in list_adapters()} == before
    assert {m["tag"] for m in bentoml_models("list")} == before_cli
    assert (deny_file().read_bytes() if deny_file().exists() else None) == denied_before
    assert served_versions(http) == served_before


def test_unload_stops_serving_now_and_a_version_saved_later_serves_again(http, tiny_base):
    one_layer_adapter("to-unload", tiny_base)
    wait_until(lambda: "to-unload" in served_versions(http), "to-unload served")
    assert generate(http, adapters=[{"name": "to-unload"}]).status_code == 200  # weights loaded

    response = http.post("/adapters/unload", json={"name": "to-unload"}, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert "to-unload" not in {row["name"] for row in response.json()["adapters"]}
    refused = generate(http, adapters=[{"name": "to-unload"}])
    assert refused.status_code == 400 and "'to-unload' is refused" in refused.text
    assert "unloaded by an admin" in refused.text
    watcher_cycle(http, tiny_base, "tick-unload")
    assert "unloaded by an admin" in listing(http)["refused"]["to-unload"]

    newer = one_layer_adapter("to-unload", tiny_base, value=0.02)
    wait_until(lambda: served_versions(http).get("to-unload") == newer.version, "new version")
    assert generate(http, adapters=[{"name": "to-unload"}]).status_code == 200


def test_deny_survives_the_watchers_rereads_refuses_uploads_and_allow_lifts_it(
    http, tiny_base, kohya_bytes
):
    response = http.post("/adapters/deny", json={"name": "uploaded"}, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json()["denied"]["uploaded"] == ["*"]
    assert response.json()["refused"]["uploaded"] == "denied by an admin"
    refused = generate(http, adapters=[{"name": "uploaded"}])
    assert refused.status_code == 400 and "denied by an admin" in refused.text

    one_layer_adapter("uploaded", tiny_base)  # a new version of a denied name
    watcher_cycle(http, tiny_base, "tick-deny")
    assert listing(http)["refused"]["uploaded"] == "denied by an admin"
    assert generate(http, adapters=[{"name": "uploaded"}]).status_code == 400
    assert '"uploaded"' in deny_file().read_text()  # in the store's home: restarts read it

    before = {e.tag for e in list_adapters()}
    again = http.post(
        "/adapters/upload", params={"name": "uploaded"}, content=kohya_bytes, headers=ADMIN
    )
    assert again.status_code == 409 and "denied by an admin" in again.json()["error"]
    assert {e.tag for e in list_adapters()} == before

    allowed = http.post("/adapters/allow", json={"name": "uploaded"}, headers=ADMIN)
    assert allowed.status_code == 200 and allowed.json()["lifted"] == "denied"
    assert "uploaded" in served_versions(http)
    assert generate(http, adapters=[{"name": "uploaded"}]).status_code == 200

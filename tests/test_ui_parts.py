"""The UI's pieces that need no browser: its switch, the request it builds, the errors it shows."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from service.settings import Settings
from service.state import ServerState
from service.ui import NO_ADAPTER, _error_text, build_request


def test_ui_switch_from_the_environment():
    assert Settings.from_env({}).ui is True
    assert Settings.from_env({"BENTOLORA_UI": "0"}).ui is False
    with pytest.raises(ValueError, match="BENTOLORA_UI='maybe' is not a boolean"):
        Settings.from_env({"BENTOLORA_UI": "maybe"})


@pytest.mark.parametrize("ui", ["0", "1"])
def test_ui_off_serves_without_gradio(ui):
    """BENTOLORA_UI=0 mounts nothing and never imports gradio (a GPU image without it serves)."""
    code = (
        "import sys, service.service as s; "
        "print('gradio' in sys.modules, any(p == '/ui' for _, p, _ in s.SDXLLoRA.mount_apps))"
    )
    env = {**os.environ, "BENTOLORA_UI": ui}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    on = str(ui == "1")
    assert out.stdout.split() == [on, on]


def test_form_to_request():
    body = build_request(
        "a cat",
        "",
        [("style", 0.5), (NO_ADAPTER, 1.0), (None, 1.0)],
        64.0,
        128.0,
        4.0,
        5.0,
        "ddim",
        -1.0,
        2.0,
    )
    assert body == {
        "prompt": "a cat",
        "negative_prompt": "",
        "width": 64,
        "height": 128,
        "steps": 4,
        "guidance": 5.0,
        "scheduler": "ddim",
        "num_images": 2,
        "adapters": [{"name": "style", "scale": 0.5}],
    }  # seed -1: none sent, the server picks one
    assert build_request("a", "", [], 64, 64, 1, 0, "euler", 7.0, 1)["seed"] == 7


def test_server_errors_shown_in_one_line():
    pydantic_style = httpx.Response(
        400,
        json={
            "error": "2 validation errors for Input",
            "detail": [
                {"loc": ["requests", 0, "prompt"], "msg": "Value error, prompt is empty"},
                {"loc": ["requests", 0, "width"], "msg": "Input should be a multiple of 8"},
            ],
        },
    )
    assert _error_text(pydantic_style) == (
        "prompt: prompt is empty; width: Input should be a multiple of 8"
    )
    assert _error_text(httpx.Response(401, json={"error": "wrong bearer token"})) == (
        "wrong bearer token"
    )
    assert _error_text(httpx.Response(502, text="bad\ngateway")) == "bad gateway"


def test_the_health_line_says_only_what_readyz_says():
    from service.state import ServedSnapshot
    from service.ui import health_text

    state = ServerState()
    assert "loading" in health_text(state)
    state.publish(ServedSnapshot(loaded=True, base_tag="sdxl-secret:v1"))
    assert health_text(state) == "Server: **ready** · GPU idle"
    state.live.broken = "CUDA error: an illegal memory access at 0xdead"
    assert "0xdead" not in health_text(state) and "broken" in health_text(state)


def test_gallery_images_are_data_urls_in_the_page():
    from service.ui import gallery_html

    page = gallery_html([{"image": "iVBORw0K", "format": "png", "seed": 7}])
    assert '<img src="data:image/png;base64,iVBORw0K"' in page and "seed 7" in page
    assert "webp;base64" in gallery_html([{"image": "x", "format": "webp", "seed": 1}])
    assert "<script" not in gallery_html([{"image": '"><script>', "format": "png", "seed": 1}])


def test_mode_forms_to_requests():
    """Each mode tab's request: its images as the base64 of the page's data URLs, its own
    fields, micro-conditioning pairs only when set, no adapters for the refiner's /refine."""
    from service.ui_modes import MODES, mode_request

    modes = {mode.key: mode for mode in MODES}
    common = {"prompt": "a cat", "negative": "", "steps": 4.0, "guidance": 5.0}
    common |= {"scheduler": "euler", "seed": 3.0, "num_images": 1.0}
    slots = ["style", 0.5, NO_ADAPTER, 1.0, NO_ADAPTER, 1.0]
    image = "data:image/png;base64,iVBORw0K"
    body = mode_request(
        modes["img2img"],
        common | {"image": image, "strength": 0.6, "original_size.0": 128.0, "original_size.1": 96},
        slots,
    )
    assert body["image"] == "iVBORw0K" and body["strength"] == 0.6 and body["seed"] == 3
    assert body["original_size"] == [128, 96] and "target_size" not in body
    assert "width" not in body and body["adapters"] == [{"name": "style", "scale": 0.5}]
    # empty or 0: not sent; no image chosen: left out (the service names the field)
    body = mode_request(
        modes["inpaint"],
        common | {"image": "", "mask": image, "strength": 1.0, "crops_coords_top_left.0": 0},
        slots,
    )
    assert (
        "image" not in body and body["mask"] == "iVBORw0K" and "crops_coords_top_left" not in body
    )
    body = mode_request(
        modes["controlnet"],
        common
        | {"width": 64, "height": 128, "controlnet": "canny", "control_image": image}
        | {"control_scale": 0.8},
        slots,
    )
    assert body["controlnets"] == [{"name": "canny", "image": "iVBORw0K", "scale": 0.8}]
    assert (body["width"], body["height"]) == (64, 128) and "control_image" not in body
    body = mode_request(
        modes["refiner"], common | {"width": 64, "height": 64, "handoff": 0.7}, slots
    )
    assert body["handoff"] == 0.7
    body = mode_request(modes["refine"], common | {"image": image, "strength": 0.3}, [])
    assert "adapters" not in body and body["strength"] == 0.3


def test_the_refiner_tabs_are_off_when_the_server_has_no_refiner():
    import gradio as gr

    from service.ui import ServerView
    from service.ui_modes import NO_REFINER, ModeTabs, mode_tabs

    view = ServerView(ServerState())
    with gr.Blocks():
        token = gr.Textbox()
        with gr.Tabs():
            tabs: ModeTabs = mode_tabs(view, token)
    assert len(tabs.sign_in_outputs()) == 1 + 2 * 2  # the ControlNet list; 2 refiner tabs
    control, *refiner = tabs.updates({"controlnets": [{"name": "canny"}], "refiner": None}, "")
    assert control["choices"] == ["canny"] and control["value"] == "canny"
    assert refiner[0]["value"] == NO_REFINER and refiner[1]["interactive"] is False
    assert refiner[2]["value"] == NO_REFINER and refiner[3]["interactive"] is False
    control, note, run, *_ = tabs.updates({"controlnets": [], "refiner": "sdxl-refiner:v1"}, "")
    assert "sdxl-refiner:v1" in note["value"] and run["interactive"] is True
    assert control["choices"] == [] and "import-controlnet" in control["info"]
    _, note, run, *_ = tabs.updates(None, "enter the token")
    assert note["value"] == "enter the token" and "interactive" not in run

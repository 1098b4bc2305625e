"""The UI's pieces that need no browser: its switch, the request it builds, the errors it shows."""

from __future__ import annotations

import httpx
import pytest

from service.settings import Settings
from service.ui import NO_ADAPTER, _error_text, build_request, mount


def test_ui_switch_from_the_environment():
    assert Settings.from_env({}).ui is True
    assert Settings.from_env({"BENTOLORA_UI": "0"}).ui is False
    with pytest.raises(ValueError, match="BENTOLORA_UI='maybe' is not a boolean"):
        Settings.from_env({"BENTOLORA_UI": "maybe"})


def test_ui_off_mounts_nothing():
    class Service:
        pass

    assert mount(Service, Settings(ui=False)) is Service
    assert not hasattr(Service, "__bentoml_gradio_apps__")


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

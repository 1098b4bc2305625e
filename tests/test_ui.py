"""The web UI at /ui in a real headless Chromium (Debian's, driven by Playwright), against a real
`bentoml serve` that requires a token. Screenshots go to artifacts/ (BENTOLORA_TEST_ARTIFACTS)."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from models.clip import build_tiny_clip, save_clip
from tests.service_helpers import server_env, start_server, stop_server
from tests.store_helpers import one_layer_adapter

pytestmark = pytest.mark.slow

TOKEN = "ui-test-token"
ARTIFACTS = Path(
    os.environ.get("BENTOLORA_TEST_ARTIFACTS", Path(__file__).parent.parent / "artifacts")
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    save_clip(*build_tiny_clip(0), "clip-tiny", source="tiny:seed=0", reuse_identical=True)
    one_layer_adapter("ui-style", tiny_base, value=0.05)
    one_layer_adapter("ui-other", tiny_base, value=-0.05)
    # Gradio's cache folder (where it keeps the files it serves at /ui/gradio_api/file=...).
    env = {**server_env(), "BENTOLORA_TOKEN": TOKEN, "GRADIO_TEMP_DIR": str(tmp / "gradio")}
    proc, url = start_server(env, tmp / "server.log")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        message = "chromium is not installed (tools/system-deps.sh installs it; make test runs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    page.close()


def set_number(page, elem_id: str, value: float) -> None:
    """Type into the number box of a Gradio slider or number field."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def pick(page, elem_id: str, option: str) -> None:
    box = page.locator(f"#{elem_id} input")
    box.click()
    page.locator(f"#{elem_id} [role=option][aria-label='{option}']").click()
    page.locator("#prompt textarea").click()  # close the list
    assert box.input_value() == option


def open_ui(page, url: str) -> None:
    page.goto(url + "/ui/")
    page.locator("#prompt textarea").wait_for()
    page.locator("#health").get_by_text("ready").wait_for()


def sign_in(page, url: str) -> None:
    open_ui(page, url)
    page.locator("#token input").fill(TOKEN)
    page.locator("#token input").press("Enter")
    page.locator("#adapters-info").get_by_text("ui-style").wait_for()


def gallery_images(page) -> list[np.ndarray]:
    """The gallery's images as pixels, as the page holds them: data URLs (never files on the
    server, which anyone with the path could download)."""
    sources = page.locator("#gallery img").evaluate_all("imgs => imgs.map(i => i.src)")
    out = []
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:80]
        data = base64.b64decode(src.split(",", 1)[1])
        out.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return out


def test_ui_asks_for_the_token_then_generates_with_two_adapters(server, page):
    open_ui(page, server)
    # The server requires a token: the UI asks for it and lists nothing before it has it.
    assert page.locator("#token input").is_visible()
    page.locator("#adapters-info").get_by_text("enter the token").wait_for()

    page.locator("#token input").fill("wrong-token")
    page.locator("#token input").press("Enter")
    page.locator("#adapters-info").get_by_text("wrong bearer token").wait_for()

    page.locator("#token input").fill(TOKEN)
    page.locator("#token input").press("Enter")
    page.locator("#adapters-info").get_by_text("ui-style").wait_for()
    assert "ui-other" in page.locator("#adapters-info").inner_text()
    # The base's native size is offered first (the tiny base: 64).
    assert page.locator("#width input[type=number]").input_value() == "64"

    page.locator("#prompt textarea").fill("a red bicycle, product photo")
    pick(page, "adapter-0", "ui-style")
    pick(page, "adapter-1", "ui-other")
    set_number(page, "scale-1", 0.5)
    set_number(page, "steps", 4)
    set_number(page, "seed", 7)
    set_number(page, "num", 2)
    page.locator("#generate").click()
    page.locator("#gallery img").nth(1).wait_for()

    text = page.locator("#metadata").inner_text()
    assert '"seed"' in text and "7" in text
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)

    # The UI is a client of the API: its images are the API's for the same request, pixel for pixel.
    request = {
        "prompt": "a red bicycle, product photo",
        "width": 64,
        "height": 64,
        "steps": 4,
        "guidance": 5.0,
        "seed": 7,
        "num_images": 2,
        "adapters": [{"name": "ui-style", "scale": 1.0}, {"name": "ui-other", "scale": 0.5}],
    }
    response = httpx.post(
        server + "/generate",
        json={"requests": [request]},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    api = [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(item["image"]))).convert("RGB"))
        for item in response.json()[0]["images"]
    ]
    assert [item["seed"] for item in response.json()[0]["images"]] == [7, 8]
    shown = gallery_images(page)
    assert len(shown) == 2
    for ui_pixels, api_pixels in zip(shown, api, strict=True):
        assert ui_pixels.shape == (64, 64, 3)
        assert np.array_equal(ui_pixels, api_pixels)


def test_ui_reuse_seed_and_bad_input(server, page):
    sign_in(page, server)

    # A blank prompt: the server's own 400 message is shown, nothing is generated.
    page.locator("#prompt textarea").fill("   ")
    page.locator("#generate").click()
    page.get_by_text("prompt is empty").first.wait_for()
    assert page.locator("#gallery img").count() == 0

    # A random seed, then "Reuse seed" puts the seed the image got into the seed box.
    page.locator("#prompt textarea").fill("a watercolor lighthouse")
    set_number(page, "steps", 3)
    page.locator("#generate").click()
    page.locator("#gallery img").first.wait_for()
    metadata = page.locator("#metadata").inner_text()
    page.locator("#reuse-seed").click()
    page.wait_for_function(
        "() => document.querySelector('#seed input').value !== '-1'", timeout=TIMEOUT_MS
    )
    seed = page.locator("#seed input").input_value()
    assert seed in metadata


def test_ui_shows_progress_while_generating(server, page):
    sign_in(page, server)
    page.locator("#prompt textarea").fill("a long render")
    set_number(page, "steps", 150)
    set_number(page, "num", 4)
    page.locator("#generate").click()
    # The pipeline's step callback feeds Gradio's progress bar (and the health line).
    page.get_by_text("denoising").first.wait_for()
    page.locator("#health").get_by_text("GPU busy").wait_for()
    page.locator("#gallery img").nth(3).wait_for()


def test_gradio_routes_the_ui_does_not_use_are_closed_and_out_of_the_api_schema(server):
    with httpx.Client(base_url=server, timeout=30) as http:
        for method, path in (
            ("POST", "/ui/gradio_api/upload"),
            ("GET", "/ui/gradio_api/upload_progress"),
            ("GET", "/ui/gradio_api/proxy=http://example.com/"),
            ("GET", "/ui/monitoring"),
            ("POST", "/ui/gradio_api/vibe-edit/"),
            ("GET", "/ui/gradio_api/file=/etc/hostname"),
            ("GET", "/ui/gradio_api/file/etc/hostname"),
            ("GET", "/ui/gradio_api/deep_link?session_hash=x"),
            ("GET", "/ui/gradio_api/run-history/records"),
        ):
            response = http.request(method, path)
            assert response.status_code == 404, (path, response.text)
        assert http.get("/ui/").status_code == 200
        paths = http.get("/docs.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()["paths"]
        assert "/generate" in paths and "/score" in paths
        assert not [p for p in paths if p.startswith("/ui")]


def call_ui(url: str, api_name: str, data: list) -> str:
    """One call of the UI's Gradio API, as anyone can make it (no Authorization header): the
    whole event stream of its answer."""
    with httpx.Client(base_url=url, timeout=120) as http:
        started = http.post(f"/ui/gradio_api/call/{api_name}", json={"data": data})
        assert started.status_code == 200, (api_name, started.text)
        event = started.json()["event_id"]
        return http.get(f"/ui/gradio_api/call/{api_name}/{event}").text


def ui_endpoints(url: str) -> dict[str, list]:
    """Each named endpoint of the UI's Gradio API, with arguments as a stranger would send them:
    defaults, examples, an empty token."""
    info = httpx.get(url + "/ui/gradio_api/info", timeout=30).json()["named_endpoints"]
    endpoints = {}
    for name, endpoint in info.items():
        args = []
        for parameter in endpoint["parameters"]:
            if parameter.get("label", "").startswith("Token"):
                args.append("")
            elif parameter.get("parameter_has_default"):
                args.append(parameter.get("parameter_default"))
            else:
                args.append(parameter.get("example_input"))
        endpoints[name.lstrip("/")] = args
    return endpoints


def test_the_ui_shows_nothing_the_api_protects_to_a_caller_without_the_token(server):
    """GET /adapters/ (token) names the base and its adapters; no UI endpoint may, without the
    token. (The health line used to name the base.)"""
    base_tag = httpx.get(
        server + "/adapters/", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    ).json()["base"]
    endpoints = ui_endpoints(server)
    assert {"health", "generate"} <= set(endpoints), sorted(endpoints)
    answers = {name: call_ui(server, name, args) for name, args in endpoints.items()}
    print(f"\nUI endpoints called without the token: {sorted(answers)}")
    for name, answer in answers.items():
        for secret in (base_tag, base_tag.split(":")[0], "ui-style", "ui-other"):
            assert secret not in answer, (name, secret, answer[:500])
    assert "ready" in answers["health"]


def test_images_generated_through_the_ui_are_not_left_on_disk_for_anyone_to_download(
    server, tmp_path_factory
):
    form = [TOKEN, "a red bicycle", "", "(none)", 1.0, "(none)", 1.0, "(none)", 1.0]
    form += [64, 64, 3, 5.0, "euler", 7, 2, None, None, None, None, None, None]
    answer = call_ui(server, "generate", form)
    assert "event: complete" in answer, answer[:500]
    # Anything the answer points to on the server must not be downloadable without the token.
    paths = re.findall(r'"(?:url|path)": "([^"]+)"', answer)
    urls = [p if p.startswith("http") else f"{server}/ui/gradio_api/file={p}" for p in paths]
    downloadable = [u for u in urls if httpx.get(u, timeout=30).status_code == 200]
    assert not downloadable, downloadable
    assert answer.count("data:image/png;base64,") == 2
    assert "gradio_api/file=" not in answer and "/gradio/" not in answer, answer[:500]
    cache = Path(tmp_path_factory.getbasetemp()).glob("ui*/gradio")
    files = [p for folder in cache for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix.lower() in (".png", ".webp", ".jpeg", ".jpg")], files

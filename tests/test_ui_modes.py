"""The web UI's image-mode tabs (service/ui_modes.py) in a real headless Chromium, against one
`bentoml serve` (tiny base, a tiny ControlNet, the tiny refiner, a token): each tab's images, from
images chosen in the page, are the HTTP endpoint's for the same request (within 2/255), and the
service's 400 for a mask of another size is shown in the page."""

from __future__ import annotations

import base64
import io
import time

import bentoml
import httpx
import numpy as np
import pytest
from PIL import Image

from tests import test_ui
from tests.service_helpers import pixels, server_env, start_server, stop_server
from tests.store_helpers import one_layer_adapter
from tests.test_image_modes import half_mask, picture
from tests.test_ui import set_number

pytestmark = pytest.mark.slow

TOKEN = "ui-modes-token"
ADAPTER = "uimodes-style"
CONTROLNET = "uimodes-edges"
TOLERANCE = 2
browser, page = test_ui.browser, test_ui.page  # the same headless Chromium fixtures


def edges(seed: int) -> Image.Image:
    array = np.zeros((64, 64, 3), dtype=np.uint8)
    for x in np.random.RandomState(seed).randint(0, 62, 6):
        array[:, x : x + 2] = 255
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The images the tests choose in the page, as PNG files."""
    folder = tmp_path_factory.mktemp("ui-modes-images")
    images = {
        "init": picture(21),
        "mask": half_mask(),
        "bad-mask": half_mask((64, 72)),
        "edges": edges(3),
    }
    for name, image in images.items():
        image.save(folder / f"{name}.png")
    return {name: folder / f"{name}.png" for name in images}


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory):
    from models.cli import main as models_cli
    from models.clip import build_tiny_clip, save_clip
    from models.controlnets import get_controlnet

    tmp = tmp_path_factory.mktemp("ui-modes")
    save_clip(*build_tiny_clip(0), "clip-tiny", source="tiny:seed=0", reuse_identical=True)
    assert models_cli(["build-tiny-refiner", "--base", "sdxl-tiny"]) == 0
    assert models_cli(["build-tiny-controlnet", "--base", "sdxl-tiny", "--name", CONTROLNET]) == 0
    adapter = one_layer_adapter(ADAPTER, tiny_base, value=0.05)
    env = server_env() | {
        "BENTOLORA_TOKEN": TOKEN,
        "BENTOLORA_REFINER": "sdxl-tiny-refiner",
        "GRADIO_TEMP_DIR": str(tmp / "gradio"),
    }
    proc, url = start_server(env, tmp / "server.log")
    yield url
    stop_server(proc)
    bentoml.models.delete(adapter.tag)
    bentoml.models.delete(get_controlnet(CONTROLNET).tag)


def api(server: str, path: str, body: dict) -> list[np.ndarray]:
    response = httpx.post(
        server + path,
        json={"requests": [body]},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return [pixels(item["image"]) for item in response.json()[0]["images"]]


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def open_tab(page, server: str, key: str, title: str) -> None:
    """Sign in with the token and open the tab of mode `key`."""
    page.goto(server + "/ui/")
    page.locator("#health").get_by_text("ready").wait_for()
    page.locator("#token input").fill(TOKEN)
    page.locator("#token input").press("Enter")
    page.locator("#adapters-info").get_by_text(ADAPTER).wait_for()
    page.get_by_role("tab", name=title, exact=True).click()
    page.locator(f"#{key}-prompt textarea").wait_for()


def choose(page, elem_id: str, path) -> None:
    """Choose an image file in an image input; wait for its preview."""
    page.locator(f"#{elem_id} input[type=file]").set_input_files(str(path))
    page.locator(f"#{elem_id} img").wait_for()


def choose_mask(page, path) -> None:
    """Choose a mask file; wait until the page shows it (its canvas takes the mask's size)."""
    width, height = Image.open(path).size
    page.locator("#inpaint-mask input[type=file]").set_input_files(str(path))
    page.wait_for_function(
        "([w, h]) => { const c = document.querySelector('#inpaint-mask canvas');"
        " return c && c.width === w && c.height === h; }",
        arg=[width, height],
    )


def pick(page, elem_id: str, option: str, key: str) -> None:
    box = page.locator(f"#{elem_id} input")
    box.click()
    page.locator(f"#{elem_id} [role=option][aria-label='{option}']").click()
    page.locator(f"#{key}-prompt textarea").click()  # close the list
    assert box.input_value() == option


def fill_common(page, key: str, prompt: str, seed: int, adapter: bool = True) -> None:
    page.locator(f"#{key}-prompt textarea").fill(prompt)
    if adapter:
        pick(page, f"{key}-adapter-0", ADAPTER, key)
        set_number(page, f"{key}-scale-0", 0.7)
    set_number(page, f"{key}-steps", 4)
    set_number(page, f"{key}-seed", seed)


def shown(page, key: str, count: int = 1) -> list[np.ndarray]:
    """The tab's gallery images (data URLs in the page) once `count` are there."""
    page.locator(f"#{key}-gallery img").nth(count - 1).wait_for()
    sources = page.locator(f"#{key}-gallery img").evaluate_all("imgs => imgs.map(i => i.src)")
    out = []
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:80]
        out.append(pixels(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))))
    return out


def assert_same(ui: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(ui) == len(want)
    for got, expected in zip(ui, want, strict=True):
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= TOLERANCE


COMMON = {"steps": 4, "guidance": 5.0, "scheduler": "euler", "num_images": 1}
STYLE = [{"name": ADAPTER, "scale": 0.7}]


def test_img2img_with_size_conditioning(server, page, files):
    open_tab(page, server, "img2img", "Image to image")
    fill_common(page, "img2img", "a house", 5)
    choose(page, "img2img-image", files["init"])
    set_number(page, "img2img-strength", 0.6)
    page.locator("#img2img-advanced").get_by_text("Advanced").click()
    set_number(page, "img2img-original_size-0", 128)
    set_number(page, "img2img-original_size-1", 96)
    page.locator("#img2img-generate").click()
    ui = shown(page, "img2img")
    body = {"prompt": "a house", "image": b64(files["init"]), "strength": 0.6, "seed": 5}
    body |= {"adapters": STYLE, "original_size": [128, 96], **COMMON}
    assert_same(ui, api(server, "/img2img", body))
    assert ui[0].shape == (64, 64, 3)
    assert np.abs(ui[0] - pixels(Image.open(files["init"]))).max() > 10  # redrawn
    # the size conditioning reached the service: without it, another image
    del body["original_size"]
    assert np.abs(ui[0] - api(server, "/img2img", body)[0]).max() > TOLERANCE
    metadata = page.locator("#img2img-metadata").inner_text()
    assert "strength" in metadata and "0.6" in metadata and "img2img" in metadata


def test_text_to_image_with_size_conditioning(server, page):
    """The text-to-image tab (service/ui.py) offers the micro-conditioning fields too."""
    open_tab(page, server, "img2img", "Image to image")
    page.get_by_role("tab", name="Text to image", exact=True).click()
    page.locator("#prompt textarea").fill("a bridge")
    set_number(page, "steps", 4)
    set_number(page, "seed", 6)
    page.locator("#advanced").get_by_text("Advanced").click()
    set_number(page, "crops_coords_top_left-0", 16)
    set_number(page, "target_size-0", 32)
    set_number(page, "target_size-1", 48)
    page.locator("#generate").click()
    page.locator("#gallery img").wait_for()
    src = page.locator("#gallery img").get_attribute("src")
    ui = [pixels(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))]
    body = {"prompt": "a bridge", "seed": 6, "width": 64, "height": 64, "adapters": [], **COMMON}
    sized = {"crops_coords_top_left": [16, 0], "target_size": [32, 48]}
    assert_same(ui, api(server, "/generate", body | sized))
    assert np.abs(ui[0] - api(server, "/generate", body)[0]).max() > TOLERANCE


def test_inpaint_and_a_mask_of_another_size(server, page, files):
    open_tab(page, server, "inpaint", "Inpaint")
    fill_common(page, "inpaint", "a roof", 8, adapter=False)
    choose(page, "inpaint-image", files["init"])
    # a mask of another size: the service's 400, naming the field, shown in the page
    choose_mask(page, files["bad-mask"])
    page.locator("#inpaint-generate").click()
    page.get_by_text("mask: 64x72").first.wait_for()
    assert page.locator("#inpaint-gallery img").count() == 0

    choose_mask(page, files["mask"])
    page.locator("#inpaint-generate").click()
    ui = shown(page, "inpaint")
    body = {"prompt": "a roof", "image": b64(files["init"]), "mask": b64(files["mask"])}
    body |= {"strength": 1.0, "seed": 8, "adapters": [], **COMMON}
    assert_same(ui, api(server, "/inpaint", body))
    init = pixels(Image.open(files["init"]))
    # kept where the mask is black (through the VAE), redrawn where it is white
    assert np.abs(ui[0][:, 32:] - init[:, 32:]).mean() > np.abs(ui[0][:, :32] - init[:, :32]).mean()

    # a mask drawn on the image: one stroke down its left quarter
    page.locator("#inpaint-mask .bl-clear").click()
    canvas = page.locator("#inpaint-mask canvas")
    canvas.scroll_into_view_if_needed()  # pointer events reach only what is in the viewport
    box = settled_box(page, canvas)
    x = box["x"] + box["width"] * 0.2
    page.mouse.move(x, box["y"] + 4)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(x, box["y"] + 4 + (box["height"] - 8) * step / 10)
    page.mouse.up()
    drawn = drawn_mask(page)
    assert drawn.size == (64, 64)
    white = np.asarray(drawn) > 127
    # a thin stroke near x = 12.8 (its anti-aliased edge columns move with the layout's
    # sub-pixel offset, e.g. a scrollbar): white near there on most rows, nothing to the right
    assert white[:, 9:17].any(axis=1).mean() > 0.8 and not white[:, 20:].any()
    before = page.locator("#inpaint-gallery img").get_attribute("src")
    page.locator("#inpaint-generate").click()
    page.wait_for_function(
        "old => document.querySelector('#inpaint-gallery img')?.src !== old", arg=before
    )
    ui = shown(page, "inpaint")
    buffer = io.BytesIO()
    drawn.save(buffer, "PNG")
    body["mask"] = base64.b64encode(buffer.getvalue()).decode()
    assert_same(ui, api(server, "/inpaint", body))


def settled_box(page, canvas, timeout_s: float = 30) -> dict:
    """The canvas's box once the page has drawn it again after a change (the template renders
    again when its value changes, on a loaded machine well after the click): the same box, of
    a square 64² canvas, three times in a row."""
    deadline = time.monotonic() + timeout_s
    boxes: list = []
    while time.monotonic() < deadline:
        size = canvas.evaluate("c => [c.width, c.height]")
        boxes = [*boxes[-2:], canvas.bounding_box()] if size == [64, 64] else []
        if len(boxes) == 3 and boxes[0] == boxes[2] and boxes[2]["height"] == boxes[2]["width"]:
            return boxes[2]
        page.wait_for_timeout(200)
    raise AssertionError(f"the mask canvas did not settle: {boxes}")


def drawn_mask(page) -> Image.Image:
    """The mask drawn in the page, as the page sends it: the strokes white on black."""
    url = page.locator("#inpaint-mask canvas").evaluate(
        """layer => {
            const out = document.createElement('canvas');
            out.width = layer.width; out.height = layer.height;
            const ctx = out.getContext('2d');
            ctx.fillStyle = 'black'; ctx.fillRect(0, 0, out.width, out.height);
            ctx.drawImage(layer, 0, 0);
            return out.toDataURL('image/png');
        }"""
    )
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("L")


def test_controlnet(server, page, files):
    open_tab(page, server, "controlnet", "ControlNet")
    fill_common(page, "controlnet", "a street", 9)
    pick(page, "controlnet-name", CONTROLNET, "controlnet")
    choose(page, "controlnet-control-image", files["edges"])
    set_number(page, "controlnet-scale", 0.8)
    assert page.locator("#controlnet-width input[type=number]").input_value() == "64"
    page.locator("#controlnet-generate").click()
    ui = shown(page, "controlnet")
    control = {"name": CONTROLNET, "image": b64(files["edges"]), "scale": 0.8}
    body = {"prompt": "a street", "controlnets": [control], "seed": 9, "adapters": STYLE}
    body |= {"width": 64, "height": 64, **COMMON}
    assert_same(ui, api(server, "/controlnet", body))
    plain = api(server, "/generate", {k: v for k, v in body.items() if k != "controlnets"})
    assert np.abs(ui[0] - plain[0]).max() > TOLERANCE


def test_the_refiner_handoff_and_refining_an_image(server, page, files):
    open_tab(page, server, "refiner", "Refiner")
    page.locator("#refiner-note").get_by_text("sdxl-tiny-refiner").wait_for()
    fill_common(page, "refiner", "a lighthouse", 11)
    set_number(page, "refiner-handoff", 0.5)
    set_number(page, "refiner-num", 2)
    page.locator("#refiner-generate").click()
    ui = shown(page, "refiner", 2)
    body = {"prompt": "a lighthouse", "handoff": 0.5, "seed": 11, "adapters": STYLE}
    body |= {"width": 64, "height": 64, **COMMON, "num_images": 2}
    assert_same(ui, api(server, "/generate_with_refiner", body))

    page.get_by_role("tab", name="Refine an image", exact=True).click()
    fill_common(page, "refine", "a lighthouse", 12, adapter=False)
    choose(page, "refine-image", files["init"])
    set_number(page, "refine-strength", 0.5)
    page.locator("#refine-generate").click()
    ui = shown(page, "refine")
    body = {"prompt": "a lighthouse", "image": b64(files["init"]), "strength": 0.5, "seed": 12}
    assert_same(ui, api(server, "/refine", body | COMMON))
    assert np.abs(ui[0] - pixels(Image.open(files["init"]))).max() > TOLERANCE

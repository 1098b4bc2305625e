"""The web UI at /ui: a Gradio app in the service's own process and port.

The UI is one more client of the service: it calls `/generate` and `/adapters/` over loopback
with the token the user types, so the same checks, batching, queue bound and limits apply to it
as to any client, and opening the UI reveals nothing a token would guard. What it reads directly
from the process is public anyway: health (as /readyz) and the denoising progress of the batch
running on the GPU.
"""

import base64
import io
import logging
import threading
import time
from typing import Any

import gradio as gr
import httpx
from PIL import Image

from service.registry import SERVED
from service.schedulers import SCHEDULERS
from service.settings import Settings

log = logging.getLogger(__name__)

PATH = "/ui"
ADAPTER_SLOTS = 3
"""Adapters one UI request can mix (the API takes up to 8)."""
EXAMPLES = [
    ["a red bicycle leaning on a brick wall, product photo, soft light", "blurry, text"],
    ["a watercolor painting of a lighthouse at dusk", ""],
    ["close-up photo of a ceramic mug on a wooden table", "low quality"],
]
NO_ADAPTER = "(none)"


class UIError(Exception):
    """What the service answered instead of images, in its own words."""


def server_address(request: gr.Request | None) -> str:
    """The service's own address: the socket the browser's request came in on, over loopback."""
    scope = getattr(getattr(request, "request", None), "scope", None) or {}
    host, port = scope.get("server") or ("127.0.0.1", 3000)
    if host in ("0.0.0.0", "::", "", None):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token.strip()}"} if token and token.strip() else {}


def _error_text(response: httpx.Response) -> str:
    """The service's error message on one line: pydantic's details as `field: message`."""
    try:
        body = response.json()
    except ValueError:
        return " ".join((response.text or response.reason_phrase).split())
    if not isinstance(body, dict):
        return str(body)
    details = body.get("detail")
    if isinstance(details, list) and details:
        parts = []
        for item in details:
            where = ".".join(str(p) for p in item.get("loc", [])[2:])  # drop "requests.0"
            message = str(item.get("msg", "")).removeprefix("Value error, ")
            parts.append(f"{where}: {message}" if where else message)
        return "; ".join(parts)
    return " ".join(str(body.get("error") or details or body).split())


def health_text() -> str:
    """What /livez and /readyz say, in words."""
    if SERVED.broken:
        return f"Server: **broken**: {SERVED.broken} (the orchestrator will restart it)"
    if not SERVED.ready:
        return "Server: **loading** the models…"
    step, steps = SERVED.progress
    busy = f" · GPU busy (step {step}/{steps})" if steps else " · GPU idle"
    return f"Server: **ready** · base `{SERVED.base_tag}`{busy}"


def list_adapters(token: str, request: gr.Request) -> tuple[Any, ...]:
    """The adapters the server serves, asked over HTTP with the user's token; without a valid
    token the list stays empty and says why."""
    unchanged = tuple(gr.update() for _ in range(ADAPTER_SLOTS))
    try:
        response = httpx.get(
            server_address(request) + "/adapters/", headers=_headers(token), timeout=30
        )
    except httpx.HTTPError as err:
        return (*unchanged, f"cannot reach the service: {err}")
    if response.status_code == 401:
        return (*unchanged, f"enter the token to list the adapters ({_error_text(response)})")
    if response.status_code != 200:
        return (*unchanged, f"adapters: {response.status_code} {_error_text(response)}")
    rows = response.json()["adapters"]
    names = [NO_ADAPTER] + [row["name"] for row in rows]
    summary = ", ".join(f"`{r['name']}` (v {r['version']}, rank {r['rank']})" for r in rows)
    return (
        *(gr.update(choices=names) for _ in range(ADAPTER_SLOTS)),
        f"Adapters: {summary}" if rows else "No adapters for this base in the store.",
    )


def default_size() -> tuple[Any, Any]:
    """The base's native size (known once it is loaded) as the form's starting size."""
    size = SERVED.default_size
    return gr.update(value=size), gr.update(value=size)


def build_request(
    prompt: str,
    negative: str,
    adapters: list[tuple[str | None, float]],
    width: float,
    height: float,
    steps: float,
    guidance: float,
    scheduler: str,
    seed: float | None,
    num_images: float,
) -> dict[str, Any]:
    """One /generate request from the form; the server checks every value and says what's wrong."""
    body: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": negative or "",
        "width": int(width),
        "height": int(height),
        "steps": int(steps),
        "guidance": float(guidance),
        "scheduler": scheduler,
        "num_images": int(num_images),
        "adapters": [
            {"name": name, "scale": float(scale)}
            for name, scale in adapters
            if name and name != NO_ADAPTER
        ],
    }
    if seed is not None and seed >= 0:
        body["seed"] = int(seed)
    return body


def call_generate(url: str, token: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = httpx.post(
        url + "/generate",
        json={"requests": [body]},
        headers=_headers(token),
        timeout=SERVED.settings.request_timeout_s + 30,
    )
    if response.status_code != 200:
        raise UIError(f"{response.status_code}: {_error_text(response)}")
    return response.json()[0]["images"]


def generate(
    token: str,
    prompt: str,
    negative: str,
    adapter_1: str,
    scale_1: float,
    adapter_2: str,
    scale_2: float,
    adapter_3: str,
    scale_3: float,
    width: float,
    height: float,
    steps: float,
    guidance: float,
    scheduler: str,
    seed: float | None,
    num_images: float,
    request: gr.Request,
    progress=gr.Progress(),  # noqa: B008 - Gradio finds the progress tracker by this default
) -> tuple[list, list[dict[str, Any]], int | None]:
    """Send the form to /generate and show progress until the images come back."""
    adapters = [(adapter_1, scale_1), (adapter_2, scale_2), (adapter_3, scale_3)]
    body = build_request(
        prompt, negative, adapters, width, height, steps, guidance, scheduler, seed, num_images
    )
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["images"] = call_generate(server_address(request), token, body)
        except (UIError, httpx.HTTPError) as err:
            outcome["error"] = str(err)
        except Exception as err:  # an answer the UI cannot read: say so, not a bare KeyError
            log.exception("UI call to /generate failed")
            outcome["error"] = f"unexpected answer from the service: {err}"

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    progress(0.0, desc="queued")
    while worker.is_alive():
        worker.join(0.1)
        done, total = SERVED.progress
        if total:
            progress((done, total), desc="denoising (the batch on the GPU)", unit="steps")
    if "error" in outcome:
        raise gr.Error(outcome["error"])
    images = outcome["images"]
    gallery = [
        (Image.open(io.BytesIO(base64.b64decode(item["image"]))), f"seed {item['seed']}")
        for item in images
    ]
    metadata = [{k: v for k, v in item.items() if k != "image"} for item in images]
    return gallery, metadata, images[0]["seed"] if images else None


def build_ui(settings: Settings) -> gr.Blocks:
    needs_token = bool(settings.bearer_token())
    with gr.Blocks(title="bentolora", analytics_enabled=False) as ui:
        gr.Markdown("# bentolora · SDXL with LoRA adapters")
        health = gr.Markdown("Server: …", elem_id="health")
        token = gr.Textbox(
            label="Token (this server requires one; press Enter)",
            type="password",
            visible=needs_token,
            elem_id="token",
        )
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                gr.Examples(EXAMPLES, inputs=[prompt, negative], label="Example prompts")
                adapters_info = gr.Markdown(elem_id="adapters-info")
                slots: list[gr.components.Component] = []
                for i in range(ADAPTER_SLOTS):
                    with gr.Row():
                        slots.append(
                            gr.Dropdown(
                                [NO_ADAPTER],
                                value=NO_ADAPTER,
                                label=f"Adapter {i + 1}",
                                elem_id=f"adapter-{i}",
                            )
                        )
                        slots.append(
                            gr.Slider(
                                -2,
                                2,
                                value=1.0,
                                step=0.05,
                                label=f"Scale {i + 1}",
                                elem_id=f"scale-{i}",
                            )
                        )
                refresh = gr.Button("Reload adapter list", size="sm")
                with gr.Row():
                    width = gr.Slider(64, 2048, value=1024, step=8, label="Width", elem_id="width")
                    height = gr.Slider(
                        64, 2048, value=1024, step=8, label="Height", elem_id="height"
                    )
                with gr.Row():
                    steps = gr.Slider(1, 150, value=30, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(0, 30, value=5.0, step=0.5, label="Guidance")
                scheduler = gr.Dropdown(list(SCHEDULERS), value="euler", label="Scheduler")
                with gr.Row():
                    seed = gr.Number(
                        value=-1, precision=0, label="Seed (-1: random)", elem_id="seed"
                    )
                    num_images = gr.Slider(1, 8, value=1, step=1, label="Images", elem_id="num")
            with gr.Column(scale=1):
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    reuse = gr.Button("Reuse seed", elem_id="reuse-seed")
                gallery = gr.Gallery(
                    label="Images", columns=2, height=420, format="png", elem_id="gallery"
                )
                metadata = gr.JSON(label="Metadata of each image", elem_id="metadata")
        last_seed = gr.State(None)

        inputs = [
            token,
            prompt,
            negative,
            *slots,
            width,
            height,
            steps,
            guidance,
            scheduler,
            seed,
            num_images,
        ]
        run.click(generate, inputs, [gallery, metadata, last_seed], concurrency_limit=None)
        prompt.submit(generate, inputs, [gallery, metadata, last_seed], concurrency_limit=None)
        reuse.click(lambda s: -1 if s is None else s, last_seed, seed)
        adapter_outputs = [*slots[0::2], adapters_info]
        refresh.click(list_adapters, token, adapter_outputs)
        token.submit(list_adapters, token, adapter_outputs)
        ui.load(list_adapters, token, adapter_outputs)
        ui.load(default_size, None, [width, height])
        ui.load(health_text, None, health)
        gr.Timer(2).tick(health_text, outputs=health)
    return ui


def mount(service_class: Any, settings: Settings) -> Any:
    """Mount the UI at /ui unless BENTOLORA_UI=0."""
    if not settings.ui:
        return service_class
    started = time.perf_counter()
    ui = build_ui(settings)
    # BentoML's mount skips what Gradio 6 does in launch() and in its own mount: choosing the
    # theme and computing the page's CSS from it (without them the page fails to render).
    ui.theme = gr.themes.Default()
    ui.css_paths = []
    ui._set_html_css_theme_variables()
    log.debug("UI built in %.1f s", time.perf_counter() - started)
    import bentoml

    service_class = bentoml.gradio.mount_gradio_app(ui, path=PATH)(service_class)
    # Gradio's ~80 internal routes are the UI's business, not the API's: keep them out of the
    # service's OpenAPI document (/docs.json), which clients and the fuzzing test read.
    _hide_from_schema(service_class.mount_apps[-1][0].routes)
    return service_class


def _hide_from_schema(routes: list) -> None:
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI's included router: its own routes
            _hide_from_schema(route.original_router.routes)
        elif hasattr(route, "include_in_schema"):
            route.include_in_schema = False

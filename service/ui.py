"""The web UI at /ui: a Gradio app in the service's own process and port.

A tab per mode: text to image here; image to image, inpainting, ControlNet and the refiner in
service.ui_modes, each built from the same controls (`Form` and the functions that fill it).
The UI is one more client of the service: it calls `/generate` (and the modes' endpoints),
`/adapters/` and `/controlnets/` over loopback with the token the user types, so the same
checks, batching, queue bound and limits apply to it as to any client, and opening the UI
reveals nothing a token would guard. What it reads directly from the process without the token
is public anyway: whether the server is ready (as /readyz) and the denoising progress of the
batch running on the GPU; the base's native size (the form's starting size) only once the token
has listed the adapters. Images travel inside the calls as data URLs both ways, never as files:
Gradio would keep a file in its cache folder and serve it to anyone who has its path.
"""

import html
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import httpx

from service.schedulers import SCHEDULERS
from service.settings import Settings
from service.state import ServerState

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
MICRO_CONDITIONING = {
    "original_size": ("Original height", "Original width"),
    "crops_coords_top_left": ("Crop top", "Crop left"),
    "target_size": ("Target height", "Target width"),
}
"""SDXL's micro-conditioning fields the mode tabs offer ([height, width] and [top, left], as
the API takes them); a pair left empty or 0 is not sent (the pipeline's default)."""


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


def health_text(state: ServerState) -> str:
    """What /livez and /readyz say, in words: nothing they do not (no base, no error text; those
    are for clients with the token: GET /adapters/ names the base)."""
    live, snapshot = state.live, state.snapshot
    if live.broken:
        return "Server: **broken** (the orchestrator will restart it)"
    if not snapshot.loaded:
        return "Server: **loading** the models…"
    step, steps = live.progress
    busy = f" · GPU busy (step {step}/{steps})" if steps else " · GPU idle"
    return f"Server: **ready**{busy}"


def fetch_adapters(token: str, request: gr.Request | None) -> tuple[dict | None, str]:
    """GET /adapters/ over HTTP with the user's token: (the listing, '') or (None, why not)."""
    try:
        response = httpx.get(
            server_address(request) + "/adapters/", headers=_headers(token), timeout=30
        )
    except httpx.HTTPError as err:
        return None, f"cannot reach the service: {err}"
    if response.status_code == 401:
        return None, f"enter the token to list the adapters ({_error_text(response)})"
    if response.status_code != 200:
        return None, f"adapters: {response.status_code} {_error_text(response)}"
    return response.json(), ""


def adapter_updates(listing: dict | None, why_not: str) -> tuple[Any, ...]:
    """The adapter dropdowns and the line above them, from a listing (or why there is none)."""
    if listing is None:
        return (*(gr.update() for _ in range(ADAPTER_SLOTS)), why_not)
    rows = listing["adapters"]
    names = [NO_ADAPTER] + [row["name"] for row in rows]
    summary = ", ".join(f"`{r['name']}` (v {r['version']}, rank {r['rank']})" for r in rows)
    adapters = f"Adapters: {summary}" if rows else "No adapters for this base in the store."
    return (
        *(gr.update(choices=names) for _ in range(ADAPTER_SLOTS)),
        f"Base `{listing.get('base')}` · {adapters}",
    )


def gallery_html(images: list[dict[str, Any]]) -> str:
    """The images the service returned (base64, as it sent them) as data URLs in the page: held
    by the browser only, never written to a file that a URL could serve to someone else."""
    figures = []
    for item in images:
        media = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}.get(
            str(item.get("format")), "image/png"
        )
        source = html.escape(f"data:{media};base64,{item['image']}", quote=True)
        caption = html.escape(f"seed {item['seed']}")
        figures.append(
            f'<figure style="margin:0"><img src="{source}" alt="{caption}" '
            'style="width:100%;height:auto">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    return (
        '<div style="display:grid;grid-template-columns:repeat(2,1fr);gap:8px">'
        + "".join(figures)
        + "</div>"
    )


def build_request(
    prompt: str,
    negative: str,
    adapters: list[tuple[str | None, float]],
    width: float | None,
    height: float | None,
    steps: float,
    guidance: float,
    scheduler: str,
    seed: float | None,
    num_images: float,
) -> dict[str, Any]:
    """One /generate request from the form; the server checks every value and says what's wrong.
    Width and height None: left out (the image modes that start from an image take its size)."""
    body: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": negative or "",
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
    if width is not None and height is not None:
        body["width"], body["height"] = int(width), int(height)
    if seed is not None and seed >= 0:
        body["seed"] = int(seed)
    return body


def call_api(
    url: str, path: str, token: str, body: dict[str, Any], timeout_s: float
) -> list[dict[str, Any]]:
    """POST one request to an image endpoint (/generate, /img2img, ...): its images, or UIError
    with the service's own message."""
    response = httpx.post(
        url + path,
        json={"requests": [body]},
        headers=_headers(token),
        timeout=timeout_s,
    )
    if response.status_code != 200:
        raise UIError(f"{response.status_code}: {_error_text(response)}")
    return response.json()[0]["images"]


class ServerView:
    """The UI's handlers that read this process's state (health, the GPU's progress, the base's
    size), bound to it: Gradio reads a handler's parameters, so they are methods."""

    def __init__(self, state: ServerState):
        self.state = state
        self.forms: list[Form] = []
        """Every tab's form (the sign-in fills their adapter lists and sizes)."""

    def health(self) -> str:
        return health_text(self.state)

    def sign_in_outputs(self, adapters_info: gr.components.Component) -> list[Any]:
        """What `sign_in` updates: the adapters line, each form's adapter lists and size."""
        outputs: list[Any] = [adapters_info]
        for form in self.forms:
            outputs += form.slots[0::2]
            outputs += [form.fields[k] for k in ("width", "height") if k in form.fields]
        return outputs

    def sign_in(self, token: str, request: gr.Request, size: bool = True) -> tuple[Any, ...]:
        """The adapters the server serves (asked over HTTP with the user's token) in every
        form and, once the service has accepted the token, the base's native size as the forms'
        starting size."""
        listing, why_not = fetch_adapters(token, request)
        *dropdowns, info = adapter_updates(listing, why_not)
        updates: list[Any] = [info]
        native = self.state.snapshot.default_size
        for form in self.forms:
            updates += dropdowns[: len(form.slots) // 2]
            for key in ("width", "height"):
                if key in form.fields:  # refused token (or not ready): no size either
                    keep = listing is None or not size
                    updates.append(gr.update() if keep else gr.update(value=native))
        return tuple(updates)

    def reload(self, token: str, request: gr.Request) -> tuple[Any, ...]:
        """The adapter lists again (the sizes as the user set them)."""
        return self.sign_in(token, request, size=False)

    def submit(
        self, path: str, token: str, body: dict[str, Any], request: gr.Request, progress: Any
    ) -> tuple[str, list[dict[str, Any]], int | None]:
        """Send one request to `path` and show progress until the images come back; the
        service's error (a 4xx naming the field) is shown to the user as it said it."""
        outcome: dict[str, Any] = {}
        snapshot = self.state.snapshot

        def call() -> None:
            try:
                outcome["images"] = call_api(
                    server_address(request),
                    path,
                    token,
                    body,
                    snapshot.settings.request_timeout_s + 30,
                )
            except (UIError, httpx.HTTPError) as err:
                outcome["error"] = str(err)
            except Exception as err:  # an answer the UI cannot read: say so, not a bare KeyError
                log.exception("UI call to %s failed", path)
                outcome["error"] = f"unexpected answer from the service: {err}"

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        progress(0.0, desc="queued")
        while worker.is_alive():
            worker.join(0.1)
            done, total = self.state.live.progress
            if total:
                progress((done, total), desc="denoising (the batch on the GPU)", unit="steps")
        if "error" in outcome:
            raise gr.Error(outcome["error"])
        images = outcome["images"]
        metadata = [{k: v for k, v in item.items() if k != "image"} for item in images]
        return gallery_html(images), metadata, images[0]["seed"] if images else None

    def generate(
        self,
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
        original_height: float | None,
        original_width: float | None,
        crop_top: float | None,
        crop_left: float | None,
        target_height: float | None,
        target_width: float | None,
        request: gr.Request,
        progress=gr.Progress(),  # noqa: B008 - Gradio finds the progress tracker by this default
    ) -> tuple[str, list[dict[str, Any]], int | None]:
        """Send the form to /generate and show progress until the images come back."""
        adapters = [(adapter_1, scale_1), (adapter_2, scale_2), (adapter_3, scale_3)]
        body = build_request(
            prompt, negative, adapters, width, height, steps, guidance, scheduler, seed, num_images
        )
        micro = [original_height, original_width, crop_top, crop_left, target_height, target_width]
        names = [f"{key}.{i}" for key in MICRO_CONDITIONING for i in (0, 1)]
        body.update(micro_conditioning(dict(zip(names, micro, strict=True))))
        return self.submit("/generate", token, body, request, progress)


# --- the form's controls, shared by the text-to-image tab and the image modes' tabs -----------


@dataclass
class Form:
    """One tab's controls. `fields`, in order, are what its handler reads (by name); `slots` the
    adapter dropdowns and scales (alternating; none on a tab whose endpoint takes no adapters);
    the output side: the run button, "Reuse seed", the gallery, the metadata, the last seed."""

    prefix: str
    fields: dict[str, gr.components.Component] = field(default_factory=dict)
    slots: list[gr.components.Component] = field(default_factory=list)
    run: Any = None
    reuse: Any = None
    gallery: Any = None
    metadata: Any = None
    last_seed: Any = None

    def id(self, name: str) -> str:
        """An element id unique to this tab (the text-to-image tab's have no prefix)."""
        return self.prefix + name

    def outputs(self) -> list[Any]:
        return [self.gallery, self.metadata, self.last_seed]


def prompt_controls(form: Form) -> None:
    form.fields["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id=form.id("prompt"))
    form.fields["negative"] = gr.Textbox(label="Negative prompt", elem_id=form.id("negative"))


def adapter_controls(form: Form) -> None:
    """ADAPTER_SLOTS adapter dropdowns (filled at sign-in), each with its scale."""
    for i in range(ADAPTER_SLOTS):
        with gr.Row():
            form.slots.append(
                gr.Dropdown(
                    [NO_ADAPTER],
                    value=NO_ADAPTER,
                    label=f"Adapter {i + 1}",
                    elem_id=form.id(f"adapter-{i}"),
                )
            )
            form.slots.append(
                gr.Slider(
                    -2,
                    2,
                    value=1.0,
                    step=0.05,
                    label=f"Scale {i + 1}",
                    elem_id=form.id(f"scale-{i}"),
                )
            )


def size_controls(form: Form) -> None:
    """Width and height (set to the base's native size at sign-in)."""
    with gr.Row():
        for key, label in (("width", "Width"), ("height", "Height")):
            form.fields[key] = gr.Slider(
                64, 2048, value=1024, step=8, label=label, elem_id=form.id(key)
            )


def sampling_controls(form: Form) -> None:
    """Steps, guidance, scheduler, seed (-1: random) and the number of images."""
    with gr.Row():
        form.fields["steps"] = gr.Slider(
            1, 150, value=30, step=1, label="Steps", elem_id=form.id("steps")
        )
        form.fields["guidance"] = gr.Slider(
            0, 30, value=5.0, step=0.5, label="Guidance", elem_id=form.id("guidance")
        )
    form.fields["scheduler"] = gr.Dropdown(
        list(SCHEDULERS), value="euler", label="Scheduler", elem_id=form.id("scheduler")
    )
    with gr.Row():
        form.fields["seed"] = gr.Number(
            value=-1, precision=0, label="Seed (-1: random)", elem_id=form.id("seed")
        )
        form.fields["num_images"] = gr.Slider(
            1, 8, value=1, step=1, label="Images", elem_id=form.id("num")
        )


def micro_conditioning_controls(form: Form) -> None:
    with gr.Accordion("Advanced: SDXL size conditioning", open=False, elem_id=form.id("advanced")):
        gr.Markdown(
            "Sizes as [height, width], the crop as [top, left]; a pair left empty (or 0) is "
            "not sent: the default (the output's size, no crop)."
        )
        for key, labels in MICRO_CONDITIONING.items():
            with gr.Row():
                for i, label in enumerate(labels):
                    form.fields[f"{key}.{i}"] = gr.Number(
                        value=None, precision=0, label=label, elem_id=form.id(f"{key}-{i}")
                    )


def micro_conditioning(values: dict[str, Any]) -> dict[str, list[int]]:
    """The micro-conditioning pairs a form sets (its values by name: `original_size.0`, ...)."""
    pairs = {}
    for key in MICRO_CONDITIONING:
        pair = [values.get(f"{key}.0") or 0, values.get(f"{key}.1") or 0]
        if any(pair):  # (0, 0): the default crop; a size of 0 is no size
            pairs[key] = [int(v) for v in pair]
    return pairs


def output_controls(form: Form, action: str) -> None:
    """The run button, "Reuse seed", the gallery (data URLs) and each image's metadata."""
    with gr.Row():
        form.run = gr.Button(action, variant="primary", elem_id=form.id("generate"))
        form.reuse = gr.Button("Reuse seed", elem_id=form.id("reuse-seed"))
    gr.Markdown("Images")
    form.gallery = gr.HTML(elem_id=form.id("gallery"), js_on_load=None)
    form.metadata = gr.JSON(label="Metadata of each image", elem_id=form.id("metadata"))
    form.last_seed = gr.State(None)
    form.reuse.click(lambda s: -1 if s is None else s, form.last_seed, form.fields["seed"])


def form_request(values: dict[str, Any], slots: list[Any]) -> dict[str, Any]:
    """The fields every image endpoint shares, from a form's values (by name) and its adapter
    slots' values (name, scale, name, scale, ...); no width/height where the form has none."""
    return build_request(
        values["prompt"],
        values["negative"],
        list(zip(slots[0::2], slots[1::2], strict=True)),
        values.get("width"),
        values.get("height"),
        values["steps"],
        values["guidance"],
        values["scheduler"],
        values["seed"],
        values["num_images"],
    )


def build_ui(settings: Settings, state: ServerState) -> gr.Blocks:
    from service import ui_modes

    view = ServerView(state)
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
            adapters_info = gr.Markdown(elem_id="adapters-info")
            refresh = gr.Button("Reload adapter list", size="sm", scale=0)
        with gr.Tabs():
            with gr.Tab("Text to image", id="txt2img"):
                view.forms.append(text_to_image_tab(view, token))
            modes = ui_modes.mode_tabs(view, token)
        outputs = view.sign_in_outputs(adapters_info) + modes.sign_in_outputs()

        def sign_in(token_value: str, request: gr.Request) -> tuple[Any, ...]:
            return (*view.sign_in(token_value, request), *modes.sign_in(token_value, request))

        def reload(token_value: str, request: gr.Request) -> tuple[Any, ...]:
            return (*view.reload(token_value, request), *modes.sign_in(token_value, request))

        refresh.click(reload, token, outputs)
        token.submit(sign_in, token, outputs)
        ui.load(sign_in, token, outputs)
        ui.load(view.health, None, health)
        gr.Timer(2).tick(view.health, outputs=health)
    return ui


def text_to_image_tab(view: ServerView, token: gr.components.Component) -> Form:
    form = Form(prefix="")
    with gr.Row():
        with gr.Column(scale=1):
            prompt_controls(form)
            gr.Examples(
                EXAMPLES,
                inputs=[form.fields["prompt"], form.fields["negative"]],
                label="Example prompts",
            )
            adapter_controls(form)
            size_controls(form)
            sampling_controls(form)
            micro_conditioning_controls(form)
        with gr.Column(scale=1):
            output_controls(form, "Generate")
    f = form.fields
    inputs = [token, f["prompt"], f["negative"], *form.slots]
    inputs += [f[k] for k in ("width", "height", "steps", "guidance", "scheduler", "seed")]
    inputs += [f["num_images"], *(f[f"{key}.{i}"] for key in MICRO_CONDITIONING for i in (0, 1))]
    form.run.click(view.generate, inputs, form.outputs(), concurrency_limit=None)
    f["prompt"].submit(view.generate, inputs, form.outputs(), concurrency_limit=None)
    return form


def mount(service_class: Any, settings: Settings, state: ServerState) -> Any:
    """Mount the UI at /ui (service.service calls this only when BENTOLORA_UI is on)."""
    started = time.perf_counter()
    ui = build_ui(settings, state)
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

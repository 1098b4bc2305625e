"""The web UI's image-mode tabs: image to image, inpainting, ControlNet, the refiner (a handoff
from the base, and refining a given image), each a form of service.ui's shared controls plus its
own, sent to its endpoint (/img2img, /inpaint, /controlnet, /generate_with_refiner, /refine).

Images go from the browser to the service inside the call, as data URLs read by the page (an
`image_input`): Gradio's upload route is closed (service.auth), so no uploaded file is ever
kept on the server either. The ControlNets and whether the server has a refiner come from
GET /controlnets/ with the user's token, at sign-in, as the adapters do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import httpx

from service.ui import (
    Form,
    ServerView,
    _error_text,
    _headers,
    adapter_controls,
    form_request,
    micro_conditioning,
    micro_conditioning_controls,
    output_controls,
    prompt_controls,
    sampling_controls,
    server_address,
    size_controls,
)

NO_REFINER = (
    "This server has no refiner (`BENTOLORA_REFINER` is not set): the refiner's tabs are off."
)
NO_CONTROLNET = "None in the store (`bentolora-models import-controlnet` adds one)."
IMAGE_TEMPLATE = """<div class="bl-image">
<label>${caption} <input type="file" accept="image/png,image/jpeg,image/webp"></label>
${value ? `<img src="${value}" alt="${caption}">` : `<p>No image chosen.</p>`}
</div>"""
IMAGE_CSS = "img { max-width: 100%; max-height: 256px; display: block; margin-top: 4px; }"
IMAGE_JS = """
element.addEventListener('change', (event) => {
  const input = event.target;
  if (!input.files || !input.files.length) return;
  const reader = new FileReader();
  reader.onload = () => { props.value = reader.result; trigger('change'); };
  reader.readAsDataURL(input.files[0]);
});
"""


def image_input(caption: str, elem_id: str) -> gr.HTML:
    """A file chooser whose value is the chosen image as a data URL, read in the browser and
    sent inside the call (not through Gradio's upload route), with a preview."""
    return gr.HTML(
        "",
        html_template=IMAGE_TEMPLATE,
        css_template=IMAGE_CSS,
        js_on_load=IMAGE_JS,
        elem_id=elem_id,
        caption=caption,
    )


MASK_TEMPLATE = """<div class="bl-mask">
<label>${caption} <input type="file" accept="image/png,image/jpeg,image/webp"></label>
<p>…or draw it on the image (white: redraw): brush
<input type="range" min="1" max="64" value="12" aria-label="brush size">
<button type="button" class="bl-clear">Clear</button></p>
<div class="bl-stage"><canvas></canvas></div>
</div>"""
MASK_CSS = """
.bl-stage { display: inline-block; background-size: 100% 100%; background-color: #888; }
canvas { display: block; width: 256px; opacity: 0.6; cursor: crosshair; touch-action: none; }
"""
MASK_JS = """
// The mask: a file chosen (sent as it is) or strokes drawn over the image chosen in
// #${props.image_id} (sent as white on black, at the image's size). Kept here and drawn again
// after each render, since setting props.value re-renders the template.
let size = [64, 64], chosen = null, strokes = [], stroke = null, shown = '';
const source = () => document.querySelector('#' + props.image_id + ' img');
const canvas = () => element.querySelector('canvas');
function sized() {  // a canvas the template has just rendered again has the default 300x150
  const layer = canvas();
  if (layer && (layer.width !== size[0] || layer.height !== size[1])) {
    layer.width = size[0]; layer.height = size[1];
  }
  return layer;
}
function render() {
  const layer = sized(), img = source();
  if (!layer) return;
  const stage = element.querySelector('.bl-stage');
  shown = img ? img.src.length + img.src.slice(-64) : '';
  stage.style.backgroundImage = img ? `url("${img.src}")` : 'none';
  const ctx = layer.getContext('2d');
  ctx.clearRect(0, 0, size[0], size[1]);
  if (chosen) ctx.drawImage(chosen, 0, 0);
  ctx.strokeStyle = 'white'; ctx.fillStyle = 'white'; ctx.lineCap = 'round'; ctx.lineJoin = 'round';
  for (const s of strokes) {
    ctx.lineWidth = s.width; ctx.beginPath(); ctx.moveTo(s.points[0][0], s.points[0][1]);
    for (const [x, y] of s.points) ctx.lineTo(x, y);
    if (s.points.length === 1) { ctx.arc(s.points[0][0], s.points[0][1], s.width / 2, 0, 7); ctx.fill(); }
    else ctx.stroke();
  }
}
function exported() {
  const out = document.createElement('canvas');
  out.width = size[0]; out.height = size[1];
  const ctx = out.getContext('2d');
  ctx.fillStyle = 'black'; ctx.fillRect(0, 0, size[0], size[1]);
  ctx.drawImage(canvas(), 0, 0);
  return out.toDataURL('image/png');
}
function publish(value) { props.value = value; trigger('change'); setTimeout(render, 0); setTimeout(render, 100); }
function point(e) {  // in image pixels, whatever size the canvas is shown at
  const r = sized().getBoundingClientRect();
  return [(e.clientX - r.left) * size[0] / r.width, (e.clientY - r.top) * size[1] / r.height];
}
element.addEventListener('pointerdown', (e) => {
  if (e.target.tagName !== 'CANVAS') return;
  const img = source();
  if (!chosen && img && img.naturalWidth && (img.naturalWidth !== size[0] || img.naturalHeight !== size[1])) {
    size = [img.naturalWidth, img.naturalHeight]; strokes = [];
  }
  render();
  const r = canvas().getBoundingClientRect();
  const brush = Number(element.querySelector('input[type=range]').value) * size[0] / r.width;
  stroke = {width: brush, points: [point(e)]}; strokes.push(stroke); render();
});
element.addEventListener('pointermove', (e) => {
  if (stroke && e.target.tagName === 'CANVAS') { stroke.points.push(point(e)); render(); }
});
window.addEventListener('pointerup', () => { if (stroke) { stroke = null; publish(exported()); } });
element.addEventListener('click', (e) => {
  if (!e.target.classList.contains('bl-clear')) return;
  chosen = null; strokes = []; element.querySelector('input[type=file]').value = ''; publish('');
});
element.addEventListener('change', (e) => {
  const input = e.target;
  if (input.type !== 'file' || !input.files || !input.files.length) return;
  const reader = new FileReader();
  reader.onload = () => {
    const img = new Image();
    img.onload = () => {
      chosen = img; strokes = []; size = [img.naturalWidth, img.naturalHeight];
      publish(reader.result);
    };
    img.src = reader.result;
  };
  reader.readAsDataURL(input.files[0]);
});
setInterval(() => {  // the image chosen beside: shown under the strokes
  const img = source();
  if ((img ? img.src.length + img.src.slice(-64) : '') !== shown) render();
}, 500);
"""


def mask_input(caption: str, elem_id: str, image_id: str) -> gr.HTML:
    """A mask: a file chosen (sent as it is), or white strokes drawn on a canvas over the image
    of `image_input` `image_id` (sent as white on black at the image's size)."""
    return gr.HTML(
        "",
        html_template=MASK_TEMPLATE,
        css_template=MASK_CSS,
        js_on_load=MASK_JS,
        elem_id=elem_id,
        caption=caption,
        image_id=image_id,
    )


def image_data(value: str | None) -> str | None:
    """The base64 of an `image_input`'s data URL; None when no image was chosen."""
    if not value or not value.startswith("data:") or "," not in value:
        return None
    return value.split(",", 1)[1]


@dataclass
class Mode:
    """One tab: its endpoint and the controls its request takes beyond prompt and sampling."""

    key: str
    title: str
    path: str
    action: str
    adapters: bool = True
    size: bool = False
    images: tuple[tuple[str, str], ...] = ()
    """(field, caption) of each image the request takes."""
    strength: float | None = None
    handoff: bool = False
    controlnet: bool = False
    refiner: bool = False
    help: str = ""


MODES = (
    Mode(
        "img2img",
        "Image to image",
        "/img2img",
        "Redraw",
        images=(("image", "Init image"),),
        strength=0.8,
        help="Redraws the init image (its size is the output's); strength: how much.",
    ),
    Mode(
        "inpaint",
        "Inpaint",
        "/inpaint",
        "Inpaint",
        images=(("image", "Image"), ("mask", "Mask (white: redraw, black: keep; image's size)")),
        strength=1.0,
        help="Redraws the image where the mask is white and keeps it where it is black.",
    ),
    Mode(
        "controlnet",
        "ControlNet",
        "/controlnet",
        "Generate",
        size=True,
        images=(("control_image", "Conditioning image (edges, depth, pose…)"),),
        controlnet=True,
        help="Follows the conditioning image's structure through one of the server's ControlNets.",
    ),
    Mode(
        "refiner",
        "Refiner",
        "/generate_with_refiner",
        "Generate with refiner",
        size=True,
        handoff=True,
        refiner=True,
        help="The base denoises the first part of the schedule, the refiner the rest.",
    ),
    Mode(
        "refine",
        "Refine an image",
        "/refine",
        "Refine",
        adapters=False,
        images=(("image", "Image to refine"),),
        strength=0.3,
        refiner=True,
        help="The refiner as image to image on your image (adapters do not apply to it).",
    ),
)


def mode_request(mode: Mode, values: dict[str, Any], slots: list[Any]) -> dict[str, Any]:
    """One request for `mode`'s endpoint from its form's values (by name) and adapter slots.
    What is missing is left out, and the service says which field it needs."""
    body = form_request(values, slots)
    if not mode.adapters:
        del body["adapters"]
    for key, _ in mode.images:
        data = image_data(values.get(key))
        if data is not None and key != "control_image":
            body[key] = data
    if mode.strength is not None:
        body["strength"] = float(values["strength"])
    if mode.handoff:
        body["handoff"] = float(values["handoff"])
    if mode.controlnet:
        body["controlnets"] = [control_choice(values)]
    body.update(micro_conditioning(values))
    return body


def control_choice(values: dict[str, Any]) -> dict[str, Any]:
    """The one ControlNet a ControlNet tab sends (the API takes up to 3)."""
    control: dict[str, Any] = {"scale": float(values["control_scale"])}
    if values.get("controlnet"):
        control["name"] = values["controlnet"]
    if (data := image_data(values.get("control_image"))) is not None:
        control["image"] = data
    return control


def mode_tab(view: ServerView, token: gr.components.Component, mode: Mode) -> ModeTab:
    form = Form(prefix=f"{mode.key}-")
    tab = ModeTab(mode, form)
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown(mode.help)
            if mode.refiner:
                tab.note = gr.Markdown(elem_id=form.id("note"))
            prompt_controls(form)
            for key, caption in mode.images:
                elem_id = form.id(key.replace("_", "-"))
                if key == "mask":
                    form.fields[key] = mask_input(caption, elem_id, form.id("image"))
                else:
                    form.fields[key] = image_input(caption, elem_id)
            if mode.strength is not None:
                form.fields["strength"] = gr.Slider(
                    0,
                    1,
                    value=mode.strength,
                    step=0.05,
                    label="Strength",
                    elem_id=form.id("strength"),
                )
            if mode.controlnet:
                with gr.Row():
                    form.fields["controlnet"] = gr.Dropdown(
                        [], label="ControlNet (the server's)", elem_id=form.id("name")
                    )
                    form.fields["control_scale"] = gr.Slider(
                        0,
                        2,
                        value=1.0,
                        step=0.05,
                        label="Conditioning scale",
                        elem_id=form.id("scale"),
                    )
            if mode.handoff:
                form.fields["handoff"] = gr.Slider(
                    0.05,
                    0.95,
                    value=0.8,
                    step=0.05,
                    label="Handoff (fraction of the steps the base denoises)",
                    elem_id=form.id("handoff"),
                )
            if mode.adapters:
                adapter_controls(form)
            if mode.size:
                size_controls(form)
            sampling_controls(form)
            micro_conditioning_controls(form)
        with gr.Column(scale=1):
            output_controls(form, mode.action)
    names = list(form.fields)

    def run(request: gr.Request, progress=gr.Progress(), *values):  # noqa: B008 (Gradio's tracker)
        # Gradio passes the special arguments first (by position), then the inputs in order
        token_value, values = values[0], values[1:]
        named = dict(zip(names, values[: len(names)], strict=True))
        body = mode_request(mode, named, list(values[len(names) :]))
        return view.submit(mode.path, token_value, body, request, progress)

    run.__name__ = mode.key  # the Gradio API's endpoint name
    inputs = [token, *form.fields.values(), *form.slots]
    form.run.click(run, inputs, form.outputs(), concurrency_limit=None, api_name=mode.key)
    return tab


@dataclass
class ModeTab:
    mode: Mode
    form: Form
    note: Any = None


@dataclass
class ModeTabs:
    """The mode tabs, and what the sign-in sets in them: the ControlNet list, the refiner's
    state (its tabs are off when the server has none)."""

    tabs: list[ModeTab] = field(default_factory=list)

    def sign_in_outputs(self) -> list[Any]:
        outputs: list[Any] = []
        for tab in self.tabs:
            if tab.mode.controlnet:
                outputs.append(tab.form.fields["controlnet"])
            if tab.mode.refiner:
                outputs += [tab.note, tab.form.run]
        return outputs

    def sign_in(self, token: str, request: gr.Request | None) -> tuple[Any, ...]:
        listing, why_not = fetch_controlnets(token, request)
        return self.updates(listing, why_not)

    def updates(self, listing: dict | None, why_not: str) -> tuple[Any, ...]:
        """The sign-in's updates from GET /controlnets/'s answer (None: refused, and why)."""
        updates: list[Any] = []
        for tab in self.tabs:
            if tab.mode.controlnet:
                if listing is None:
                    updates.append(gr.update())
                else:
                    names = [row["name"] for row in listing["controlnets"]]
                    value, info = (names[0], None) if names else (None, NO_CONTROLNET)
                    updates.append(gr.update(choices=names, value=value, info=info))
            if tab.mode.refiner:
                if listing is None:
                    updates += [gr.update(value=why_not), gr.update()]
                elif listing.get("refiner"):
                    refiner = f"Refiner: `{listing['refiner']}`"
                    updates += [gr.update(value=refiner), gr.update(interactive=True)]
                else:
                    updates += [gr.update(value=NO_REFINER), gr.update(interactive=False)]
        return tuple(updates)


def fetch_controlnets(token: str, request: gr.Request | None) -> tuple[dict | None, str]:
    """GET /controlnets/ with the user's token: (the listing, '') or (None, why not)."""
    try:
        response = httpx.get(
            server_address(request) + "/controlnets/", headers=_headers(token), timeout=30
        )
    except httpx.HTTPError as err:
        return None, f"cannot reach the service: {err}"
    if response.status_code != 200:
        return None, f"ControlNets and refiner: {response.status_code} {_error_text(response)}"
    return response.json(), ""


def mode_tabs(view: ServerView, token: gr.components.Component) -> ModeTabs:
    """One tab per image mode (inside the caller's gr.Tabs); their forms join `view.forms`."""
    tabs = ModeTabs()
    for mode in MODES:
        with gr.Tab(mode.title, id=mode.key, elem_id=f"tab-{mode.key}"):
            tab = mode_tab(view, token, mode)
        tabs.tabs.append(tab)
        view.forms.append(tab.form)
    return tabs

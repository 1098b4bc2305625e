"""In-process serving: plain diffusers (the baseline) and the service's Engine, same weights."""

from __future__ import annotations

import base64
import io
import itertools
import logging
import statistics
import time
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from bench.measure import Row, image_diff, measure_row
from models.adapter import weights_path
from models.device import resolve_dtype
from models.store import StoreEntry
from service.schemas import AdapterChoice, GenerateRequest

log = logging.getLogger(__name__)

PROMPT = "a red circle on a blue background"
SEED = 1234


@dataclass(frozen=True)
class Workload:
    size: int
    steps: int
    batch: int
    guidance: float = 5.0
    repeats: int = 3


def seeds(n: int) -> list[int]:
    return [SEED + i for i in range(n)]


def diffusers_call(pipe: StableDiffusionXLPipeline, work: Workload, n: int):
    return pipe(
        prompt=[PROMPT] * n,
        width=work.size,
        height=work.size,
        num_inference_steps=work.steps,
        guidance_scale=work.guidance,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds(n)],
    ).images


def load_baseline(base: StoreEntry, device: str) -> tuple[StableDiffusionXLPipeline, float]:
    """The store folder through plain `from_pretrained`, as a hand-written server would load it."""
    dtype = resolve_dtype("auto", device)
    started = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(base.path, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, time.perf_counter() - started


def baseline_rows(
    pipe: StableDiffusionXLPipeline, adapter: StoreEntry | None, work: Workload, device: str
) -> tuple[list[Row], dict[str, list]]:
    """Eager diffusers, 1 image per call and `batch` per call, then with `adapter` (unfused)."""
    rows, images = [], {}
    for n in sorted({1, work.batch}):
        row = Row("serve", f"diffusers eager, batch {n}")
        measure_row(
            row,
            lambda n=n: diffusers_call(pipe, work, n),
            repeats=work.repeats,
            images_per_call=n,
            device=device,
        )
        rows.append(row)
    images["plain"] = diffusers_call(pipe, work, work.batch)
    if adapter is not None:
        pipe.load_lora_weights(str(adapter.path), weight_name=weights_path(adapter).name)
        row = Row(
            "serve", f"diffusers eager + LoRA r{adapter.metadata['rank']}, batch {work.batch}"
        )
        measure_row(
            row,
            lambda: diffusers_call(pipe, work, work.batch),
            repeats=work.repeats,
            images_per_call=work.batch,
            device=device,
        )
        rows.append(row)
        images["lora"] = diffusers_call(pipe, work, work.batch)
        pipe.unload_lora_weights()
    return rows, images


def make_engine(device: str, batch: int, speed: dict | None = None):
    """The service's Engine on the benchmark store; `speed`: Settings fields (compile, …)."""
    from bench.fixtures import BASE, CLIP
    from service.engine import Engine
    from service.settings import Settings

    settings = Settings(
        base=BASE,
        clip=CLIP,
        device=device,
        max_batch_images=batch,
        max_pixels=4096 * 4096,
        ui=False,
        **(speed or {}),
    )
    started = time.perf_counter()
    engine = Engine(settings)
    return engine, time.perf_counter() - started


def engine_requests(work: Workload, n: int, adapter: str | None):

    return [
        GenerateRequest(
            prompt=PROMPT,
            width=work.size,
            height=work.size,
            steps=work.steps,
            guidance=work.guidance,
            seed=s,
            adapters=[{"name": adapter, "scale": 1.0}] if adapter else [],
        )
        for s in seeds(n)
    ]


def mixed_rows(
    engine, adapters: list[str], work: Workload, device: str, counts: list[int], label: str = ""
) -> list[Row]:
    """Batches of `work.batch` requests whose adapters come from `k` distinct ones (request j of
    call c takes adapter (c·batch + j) mod k), for each k in `counts`; each row's ratio is taken
    against the same engine's k = 1 row (the cost of mixing). `label` names the engine."""
    rows = []
    for k in counts:
        if k > len(adapters):
            raise ValueError(f"{k} adapters in the traffic, {len(adapters)} built")
        calls = itertools.count()

        def call(k=k, calls=calls):
            c = next(calls)
            requests = engine_requests(work, work.batch, None)
            for j, request in enumerate(requests):
                name = adapters[(c * work.batch + j) % k]
                request.adapters = [AdapterChoice(name=name, scale=1.0)]
            engine.generate(requests)

        for _ in range(-(-k // work.batch)):  # every adapter loaded before the timed calls
            call()
        row = Row("serve", f"engine{label}, batch {work.batch}, {k} adapters in the traffic")
        measure_row(row, call, repeats=work.repeats, images_per_call=work.batch, device=device)
        if k != counts[0]:
            row.baseline = rows[0].name
        rows.append(row)
    return rows


def engine_images(engine, work: Workload, n: int, adapter: str | None) -> list:
    responses = engine.generate(engine_requests(work, n, adapter))
    return [decode_png(image.image) for r in responses for image in r.images]


def decode_png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def engine_rows(
    engine, adapters: list[str], work: Workload, device: str, label: str = ""
) -> tuple[list[Row], dict[str, list]]:
    """The service's pipeline: without an adapter (batch 1 and batch), with one, and alternating
    between two adapters call by call (the cost of switching: the engine's own
    `adapter_switch_s`, p50 in the row's extra)."""
    rows, images = [], {}
    name = f"engine{label}"
    plans = [(f"{name}, batch {n}", n, [None]) for n in sorted({1, work.batch})]
    if adapters:
        plans.append((f"{name} + LoRA, batch {work.batch}", work.batch, adapters[:1]))
    if len(adapters) > 1:
        plans.append((f"{name}, LoRA switching a/b, batch {work.batch}", work.batch, adapters))
    for row_name, n, cycle in plans:
        calls = itertools.cycle(cycle)
        switches: list[float] = []

        def call(n=n, calls=calls, switches=switches):
            responses = engine.generate(engine_requests(work, n, next(calls)))
            switches.append(responses[0].images[0].timings["adapter_switch_s"])

        row = Row("serve", row_name)
        measure_row(row, call, repeats=work.repeats, images_per_call=n, device=device)
        if cycle != [None]:
            row.extra["adapter_switch_s_p50"] = statistics.median(switches[1:] or switches)
        rows.append(row)
    images["plain"] = engine_images(engine, work, work.batch, None)
    if adapters:
        images["lora"] = engine_images(engine, work, work.batch, adapters[0])
    return rows, images


def profile_engine(engine, adapters: list[str], work: Workload, device: str, out, label: str):
    """One batch with an adapter under torch.profiler (bench.profile): where the time goes."""
    from bench.profile import profile_call

    adapter = adapters[0] if adapters else None
    return profile_call(
        lambda: engine.generate(engine_requests(work, work.batch, adapter)),
        device,
        out,
        f"engine{label} + LoRA, batch {work.batch}",
    )


def correctness(reference: dict[str, list], candidate: dict[str, list]) -> dict[str, dict]:
    """Per case (plain, lora): the candidate's images against the eager baseline's, same seeds."""
    return {
        k: image_diff(reference[k][: len(candidate[k])], candidate[k])
        for k in reference
        if k in candidate
    }

"""Evaluate a stored adapter: render fixed seeds with the base, the adapter and the production
version, score the images (models.quality), record the results, and apply the quality gate.

Everything that can be wrong with the inputs is found by `plan` before any image is generated;
the store is written (evaluation metadata, then stage labels) only after every image is scored.

What an evaluation reads: a prompts file, `.txt` (one prompt a line, blank lines and lines
starting with `#` ignored) or `.jsonl` (one object a line: `{"prompt": "...", "image":
"optional/path.png"}`, the image path relative to the file's folder); rows with an image are
compared with it pixel by pixel (SSIM, lpips_clip). A reference folder holds real images that the
generated set is compared with as a distribution (fid_clip, kid_clip).

By default both come from the adapter's held-out images (`validation_split` or `validation_dir`
at training, listed in its metadata with their captions and sha256): each caption is a prompt with
its photo as the pairwise reference, and the photos are the reference set. The quality gate
(`--promote`) asks for more than beating the production version: every threshold the recipe set
(`gate_max_fid_clip`, `gate_min_ssim`, `gate_max_lpips_clip`, or the same options here) must hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from models.adapter import apply_adapters, check_made_for, get_adapter
from models.bases import get_base
from models.clip import KIND as CLIP_KIND
from models.clip import ClipScorer
from models.device import resolve_device, resolve_dtype
from models.hashing import hash_file
from models.loading import load_pipeline
from models.quality import (
    HIGHER_IS_BETTER,
    clip_image_features,
    clip_score_stats,
    fid,
    kid,
    lpips_clip,
    ssim,
    to_tensor,
)
from models.stages import production_versions, promote
from models.store import StoreEntry, get_entry, update_entry
from train.config import GATES, VALIDATION_SEED
from train.data import IMAGE_SUFFIXES, to_rgb, upright

log = logging.getLogger(__name__)

DEFAULT_CLIP = "clip-tiny"
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 5.0


class EvaluationInputError(ValueError):
    """A prompts file, reference image or reference folder cannot be used; says which and why."""


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    reference: Path | None = None
    """A real image for this prompt, compared pairwise with what is generated from it."""


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    """Why, for the production rule: the metric, both values and the margin."""
    thresholds: tuple[str, ...] = ()
    """One line per gate threshold: the metric, its value, the threshold, met or missed."""


@dataclass
class EvalOptions:
    """What `python -m train evaluate` takes; 0 / "" / None mean "from the adapter's metadata"."""

    adapter: str
    prompts: str = ""
    clip: str = ""
    reference: str = ""
    seeds_per_prompt: int = 1
    seed: int = VALIDATION_SEED
    size: int = 0
    steps: int = 0
    guidance: float | None = None
    scale: float = 1.0
    metric: str = "clip_score"
    margin: float = 0.0
    promote: bool = False
    device: str = "auto"
    dtype: str = "auto"
    out: str = ""
    gate_max_fid_clip: float | None = None
    gate_min_ssim: float | None = None
    gate_max_lpips_clip: float | None = None


@dataclass
class Plan:
    """Everything resolved and checked before the first image is generated."""

    options: EvalOptions
    adapter: StoreEntry
    base: StoreEntry
    production: StoreEntry | None
    clip: str
    rows: list[PromptRow]
    references: dict[int, Image.Image]
    """Prompt index -> its reference image."""
    reference_images: list[Image.Image]
    size: int
    steps: int
    guidance: float
    device: str
    dtype: torch.dtype
    out: Path
    metrics: list[str]
    """The metrics these inputs allow, in table order."""
    jobs: list[tuple[int, int, int]]
    """(prompt index, seed index, seed) per image."""
    gates: dict[str, tuple[str, float]]
    """Metric -> ("<" or ">", threshold) that `--promote` requires of the adapter."""
    held_out: dict[str, Any] | None = None
    """The adapter's held-out listing, when prompts or references came from it."""


@dataclass
class Evaluation:
    plan: Plan
    results: dict[str, dict[str, Any]]
    """Variant ("base", "adapter", "production") -> metric -> value."""
    reference_variant: str
    decision: Decision | None
    archived: list[str]
    results_path: Path


def plan(options: EvalOptions) -> Plan:
    """Resolve the adapter, its base, the production version, the CLIP model and the inputs, or
    raise (StoreError, AdapterError, EvaluationInputError) saying what to change."""
    if options.seeds_per_prompt < 1:
        raise EvaluationInputError("--seeds-per-prompt must be at least 1")
    if options.metric not in HIGHER_IS_BETTER:
        raise EvaluationInputError(
            f"--metric {options.metric!r} is not one of {', '.join(HIGHER_IS_BETTER)}"
        )
    adapter = get_adapter(options.adapter)
    base = get_base(adapter.metadata.get("base_tag", ""))
    check_made_for(adapter, base)
    rows, reference_images, held_out = _inputs(options, adapter)
    references = {i: open_image(r.reference) for i, r in enumerate(rows) if r.reference}
    metrics = _metrics(options, references, reference_images)
    images = len(rows) * options.seeds_per_prompt
    if reference_images and images < 2:
        raise EvaluationInputError(
            f"fid_clip and kid_clip need at least 2 generated images; {images} would be made: "
            "add prompts or raise --seeds-per-prompt"
        )
    training = adapter.metadata.get("training_config") or {}
    clip = options.clip or training.get("validation_clip") or DEFAULT_CLIP
    clip = get_entry(clip, kind=CLIP_KIND).tag
    size = options.size or _positive_int(training.get("resolution")) or native_size(base)
    if size % 8 or size < 16:
        raise EvaluationInputError(f"--size {size}: use a multiple of 8, at least 16")
    if options.steps < 0:
        raise EvaluationInputError("--steps must be at least 1")
    steps = options.steps or _positive_int(training.get("validation_inference_steps"))
    gates = _gates(options, training, metrics)
    guidance = options.guidance
    if guidance is None:
        trained = training.get("validation_guidance")
        guidance = float(trained) if isinstance(trained, (int, float)) else DEFAULT_GUIDANCE
    device = _device(options.device)
    out = Path(options.out or Path("runs") / "evaluate" / f"{adapter.name}-{adapter.version}")
    n = len(rows)
    jobs = [
        (i, j, options.seed + j * n + i) for i in range(n) for j in range(options.seeds_per_prompt)
    ]
    return Plan(
        options=options,
        adapter=adapter,
        base=base,
        production=_production(adapter),
        clip=clip,
        rows=rows,
        references=references,
        reference_images=reference_images,
        size=size,
        steps=steps or DEFAULT_STEPS,
        guidance=guidance,
        device=device,
        dtype=resolve_dtype(options.dtype, device),
        out=out,
        metrics=metrics,
        jobs=jobs,
        gates=gates,
        held_out=held_out,
    )


def _inputs(
    options: EvalOptions, adapter: StoreEntry
) -> tuple[list[PromptRow], list[Image.Image], dict[str, Any] | None]:
    """(prompt rows, reference set, the held-out listing if either came from it): --prompts and
    --reference where given, else the adapter's held-out images."""
    held = None if options.prompts and options.reference else held_out_listing(adapter)
    images = held_out_images(held, adapter) if held is not None else []
    if options.prompts:
        rows = read_prompts(options.prompts)
    elif held is not None:
        rows = [PromptRow(caption, path) for caption, path in images]
    else:
        raise EvaluationInputError(
            f"--prompts is required: {adapter.tag} was trained without held-out images "
            "(set validation_split or validation_dir in its recipe to have them by default)"
        )
    if options.reference:
        return rows, read_reference_dir(options.reference), held
    reference_images = [open_image(path) for _, path in images] if len(images) >= 2 else []
    return rows, reference_images, held


def _metrics(
    options: EvalOptions, references: dict[int, Image.Image], reference_images: list
) -> list[str]:
    """The metrics the inputs allow; refuses a --metric they do not."""
    metrics = ["clip_score"]
    if references:
        metrics += ["ssim", "lpips_clip"]
    if reference_images:
        metrics += ["fid_clip", "kid_clip"]
    if options.metric not in metrics:
        need = (
            "--reference DIR (a folder of real images) or at least 2 held-out images"
            if options.metric in ("fid_clip", "kid_clip")
            else 'reference images in the prompts file (.jsonl rows with "image") or held-out '
            "images"
        )
        raise EvaluationInputError(f"--metric {options.metric} needs {need}")
    return metrics


def _gates(
    options: EvalOptions, training: dict, metrics: list[str]
) -> dict[str, tuple[str, float]]:
    """The thresholds --promote applies: each option given here, else the recipe's; 0 is none.
    With --promote, a threshold on a metric these inputs cannot measure is refused."""
    gates = {}
    for field, (metric, op) in GATES.items():
        value = getattr(options, field)
        if value is None:
            value = training.get(field) or 0.0
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise EvaluationInputError(f"{field}: {value!r} must be a number, 0 or more")
        if value:
            gates[metric] = (op, float(value))
    unmeasured = [m for m in gates if m not in metrics]
    if options.promote and unmeasured:
        raise EvaluationInputError(
            f"the gate threshold on {', '.join(unmeasured)} needs reference images: held-out "
            "images (validation_split or validation_dir in the recipe), or --prompts with "
            "images and --reference DIR; or pass --gate-... 0 to drop the threshold"
        )
    return gates


def held_out_listing(adapter: StoreEntry) -> dict[str, Any] | None:
    """The held-out images the adapter's metadata lists (`dataset.held_out`), or None."""
    held = (adapter.metadata.get("dataset") or {}).get("held_out")
    return held if isinstance(held, dict) and held.get("images") else None


def held_out_images(held: dict[str, Any], adapter: StoreEntry) -> list[tuple[str, Path]]:
    """(caption, path) of each held-out image, each file checked against its recorded sha256."""
    root = Path(held["root"])
    images = []
    for image in held["images"]:
        path = root / image["file"]
        if not path.is_file():
            problem = "is missing"
        elif hash_file(path) != image["sha256"]:
            problem = f"changed since {adapter.tag} was trained (its sha256 differs)"
        else:
            images.append((image["caption"], path))
            continue
        raise EvaluationInputError(
            f"held-out image {path} {problem}; restore it, or pass --prompts and --reference"
        )
    return images


def _positive_int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def native_size(base: StoreEntry) -> int:
    """The base's default image side: UNet sample size × VAE downscaling (1024 for SDXL)."""
    unet = json.loads((base.path / "unet" / "config.json").read_text())
    vae = json.loads((base.path / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _device(name: str) -> str:
    name = resolve_device(name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationInputError(f"--device {name}: no CUDA device is available")
    return name


def _production(adapter: StoreEntry) -> StoreEntry | None:
    """The newest other production version of the adapter's name, if it fits the same base."""
    for entry in production_versions(adapter.name):
        if entry.tag == adapter.tag:
            continue
        if entry.metadata.get("base_hash") != adapter.metadata.get("base_hash"):
            log.warning(
                "production version %s was made for base %s, not %s; comparing with the base",
                entry.tag,
                entry.metadata.get("base_tag"),
                adapter.metadata.get("base_tag"),
            )
            return None
        return entry
    return None


def evaluate(plan: Plan) -> Evaluation:
    """Render and score every variant, then write results.json, the adapter's `evaluation`
    metadata and, with `promote`, the stage labels the gate decides."""
    options = plan.options
    pipe = load_pipeline(f"store:{plan.base.tag}", dtype=plan.dtype, device=plan.device)
    pipe.set_progress_bar_config(disable=True)
    scorer = ClipScorer.from_store(plan.clip, device=plan.device)
    reference_features = (
        clip_image_features(scorer, plan.reference_images) if plan.reference_images else None
    )
    variants: list[tuple[str, StoreEntry | None]] = [("base", None), ("adapter", plan.adapter)]
    if plan.production is not None:
        variants.append(("production", plan.production))
    results = {}
    for label, entry in variants:
        if entry is not None:
            apply_adapters(pipe, [(entry, options.scale)], base=plan.base)
        images = render(pipe, plan, plan.out / label, label)
        results[label] = score(scorer, plan, images, reference_features)
        results[label]["tag"] = entry.tag if entry is not None else plan.base.tag
    reference_variant = "production" if plan.production is not None else "base"
    decision = None
    if options.promote:
        decision = decide(
            options.metric,
            results["adapter"][options.metric],
            results[reference_variant][options.metric],
            margin=options.margin,
            reference_name=f"{reference_variant} {results[reference_variant]['tag']}",
        )
        decision = apply_gates(decision, plan.gates, results["adapter"])
    record = _record(plan, results, reference_variant, decision)
    results_path = plan.out / "results.json"
    results_path.write_text(json.dumps(record, indent=2) + "\n")
    update_entry(plan.adapter.tag, metadata={"evaluation": _summary(record)})
    archived = promote(plan.adapter) if decision is not None and decision.promote else []
    return Evaluation(plan, results, reference_variant, decision, archived, results_path)


@torch.no_grad()
def render(pipe, plan: Plan, out_dir: Path, label: str) -> list[Image.Image]:
    """One image per job, each from its own CPU generator, saved as `<prompt>-<seed index>.png`."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    images = []
    for i, j, seed in tqdm(plan.jobs, desc=f"rendering {label}", unit="image"):
        image = pipe(
            plan.rows[i].prompt,
            height=plan.size,
            width=plan.size,
            num_inference_steps=plan.steps,
            guidance_scale=plan.guidance,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]
        image.save(out_dir / f"{i:03d}-{j:02d}.png")
        images.append(image)
    return images


def score(
    scorer: ClipScorer,
    plan: Plan,
    images: list[Image.Image],
    reference_features: torch.Tensor | None,
) -> dict[str, Any]:
    """Every metric `plan.metrics` allows, for one variant's images (in job order)."""
    prompts = [plan.rows[i].prompt for i, _, _ in plan.jobs]
    clip = clip_score_stats(scorer, images, prompts)
    out: dict[str, Any] = {
        "clip_score": clip["mean"],
        "clip_score_std": clip["std"],
        "clip_score_per_image": clip["per_image"],
    }
    paired = [(image, i) for image, (i, _, _) in zip(images, plan.jobs, strict=True)]
    paired = [(image, plan.references[i]) for image, i in paired if i in plan.references]
    if paired:
        generated = [image for image, _ in paired]
        references = [
            ref.resize(image.size, Image.Resampling.BICUBIC) if ref.size != image.size else ref
            for image, ref in paired
        ]
        out["ssim"] = float(ssim(to_tensor(generated), to_tensor(references)).mean())
        out["lpips_clip"] = float(lpips_clip(scorer, generated, references).mean())
        out["paired_images"] = len(paired)
    if reference_features is not None:
        features = clip_image_features(scorer, images)
        out["fid_clip"] = fid(features, reference_features)
        out["kid_clip"], out["kid_clip_std"] = kid(features, reference_features)
    return out


def _record(plan: Plan, results, reference_variant: str, decision: Decision | None) -> dict:
    options = plan.options
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "adapter": plan.adapter.tag,
        "base": plan.base.tag,
        "production": plan.production.tag if plan.production is not None else "",
        "clip": plan.clip,
        **_sources(plan),
        "prompts": len(plan.rows),
        "reference_images": len(plan.reference_images),
        "seeds_per_prompt": options.seeds_per_prompt,
        "seeds": [seed for _, _, seed in plan.jobs],
        "size": plan.size,
        "steps": plan.steps,
        "guidance": plan.guidance,
        "scale": options.scale,
        "device": plan.device,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "metrics": plan.metrics,
        "results": results,
        "reference_variant": reference_variant,
        "gate": (
            {
                "metric": options.metric,
                "margin": options.margin,
                "limits": {m: f"{op} {limit:g}" for m, (op, limit) in plan.gates.items()},
                **asdict(decision),
            }
            if decision is not None
            else None
        ),
        "images": {label: str(plan.out / label) for label in results},
    }


def _sources(plan: Plan) -> dict[str, Any]:
    """Where the prompts and the reference set came from: files, or the held-out images."""
    options = plan.options
    held = (
        hashlib.sha256(json.dumps(plan.held_out, sort_keys=True).encode()).hexdigest()
        if plan.held_out is not None
        else ""
    )
    held_root = f"held-out images of {plan.held_out['root']}" if plan.held_out else ""
    return {
        "prompts_file": str(Path(options.prompts).resolve()) if options.prompts else held_root,
        "prompts_sha256": hash_file(options.prompts) if options.prompts else held,
        "reference_dir": (
            str(Path(options.reference).resolve())
            if options.reference
            else held_root
            if plan.reference_images
            else ""
        ),
    }


def _summary(record: dict) -> dict:
    """What the store keeps: the record without per-image lists and local image paths."""
    summary = {k: v for k, v in record.items() if k not in ("images", "results")}
    summary["gate"] = summary["gate"] or {}
    summary["results"] = {
        label: {k: v for k, v in values.items() if not k.endswith("_per_image")}
        for label, values in record["results"].items()
    }
    return summary


# --- the inputs: prompts, reference images


def read_prompts(path: str | Path) -> list[PromptRow]:
    """The rows of a `.txt` or `.jsonl` prompts file; at least one, else EvaluationInputError."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationInputError(f"prompts file {path}: no such file")
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise EvaluationInputError(
            f"prompts file {path}: use .txt (one prompt a line) or .jsonl "
            '({"prompt": ..., "image": optional path})'
        )
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise EvaluationInputError(f"prompts file {path}: does not read as UTF-8 ({err})") from err
    if path.suffix.lower() == ".txt":
        rows = [PromptRow(s) for line in lines if (s := line.strip()) and not s.startswith("#")]
    else:
        rows = [
            _jsonl_row(path, number, line)
            for number, line in enumerate(lines, start=1)
            if line.strip()
        ]
    if not rows:
        raise EvaluationInputError(f"prompts file {path} holds no prompts")
    return rows


def _jsonl_row(path: Path, number: int, line: str) -> PromptRow:
    where = f"prompts file {path}, line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise EvaluationInputError(f"{where}: not JSON ({err})") from err
    if not isinstance(row, dict):
        raise EvaluationInputError(f'{where}: expected an object like {{"prompt": "..."}}')
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise EvaluationInputError(f'{where}: "prompt" must be a non-empty string')
    image = row.get("image")
    if image is None or image == "":
        return PromptRow(prompt.strip())
    if not isinstance(image, str):
        raise EvaluationInputError(f'{where}: "image" must be a path relative to {path.parent}')
    reference = (path.parent / image).resolve()
    if not reference.is_file():
        raise EvaluationInputError(f"{where}: reference image {reference}: no such file")
    return PromptRow(prompt.strip(), reference)


def open_image(path: Path) -> Image.Image:
    """Decode `path` fully into upright (EXIF orientation) 8-bit RGB, as training sees its
    images, or raise EvaluationInputError naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return to_rgb(upright(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise EvaluationInputError(f"image {path}: too large ({err})") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise EvaluationInputError(f"image {path}: not a readable image ({err})") from err


def read_reference_dir(path: str | Path) -> list[Image.Image]:
    """Every image directly in folder `path` (sorted by name), decoded; at least 2 (FID needs a
    covariance), else EvaluationInputError."""
    path = Path(path)
    if not path.is_dir():
        raise EvaluationInputError(f"reference folder {path}: no such folder")
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if len(files) < 2:
        raise EvaluationInputError(
            f"reference folder {path}: {len(files)} images with suffixes "
            f"{', '.join(IMAGE_SUFFIXES)}; fid_clip and kid_clip need at least 2"
        )
    return [open_image(p) for p in files]


# --- the quality gate: does a candidate beat its reference on one metric by a margin?


def gain(metric: str, candidate: float, reference: float) -> float:
    """How much better `candidate` is than `reference` on `metric` (negative: worse)."""
    return candidate - reference if HIGHER_IS_BETTER[metric] else reference - candidate


def better(metric: str, candidate: float, reference: float) -> bool:
    return gain(metric, candidate, reference) > 0


def decide(
    metric: str, candidate: float, reference: float, *, margin: float, reference_name: str
) -> Decision:
    """Promote only when the candidate improves on the reference by more than `margin`."""
    direction = "higher" if HIGHER_IS_BETTER[metric] else "lower"
    improvement = gain(metric, candidate, reference)
    facts = (
        f"{metric} {candidate:.4f} vs {reference:.4f} for {reference_name} "
        f"({direction} is better): improvement {improvement:+.4f}"
    )
    if not math.isfinite(improvement):
        return Decision(False, f"{facts} is not a number")
    if improvement > margin:
        return Decision(True, f"{facts} > margin {margin:g}")
    return Decision(False, f"{facts} is not more than margin {margin:g}")


def apply_gates(
    decision: Decision, gates: dict[str, tuple[str, float]], values: dict[str, Any]
) -> Decision:
    """`decision`, refused unless the adapter's value of every gated metric is strictly on the
    threshold's good side (a NaN is not)."""
    lines, met = [], True
    for metric, (op, limit) in gates.items():
        value = float(values[metric])
        ok = value < limit if op == "<" else value > limit
        met = met and ok
        verdict = "meets" if ok else "MISSES"
        lines.append(f"{metric} {value:.4f} {verdict} the threshold {op} {limit:g}")
    return Decision(decision.promote and met, decision.reason, tuple(lines))

"""`python -m train selftest --config FILE`: is this machine, this data and this store ready for the
recipe? Checked before a long run, each failure with its fix.

The checks, in order: the devices (GPUs and their memory, against the processes and precision
the recipe needs), the libraries (installed versions within bentolora's ranges), the dataset
(images per folder, unreadable or truncated images, missing captions, images smaller than their
training size, duplicates, the held-out images the gate needs), the model store (the base, the
CLIP model, writable), then a trial: the recipe's run set up for real, the free disk its
checkpoints and cache need, two training steps at the recipe's resolution and batch size (their
time and peak memory) and one validation render (not blank). A check that cannot run because an
earlier one failed is skipped, saying which.

The trial writes its run to a temporary folder, removed afterwards; it fills the recipe's latent
cache (`cache_dir`), which the real run then reuses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from packaging.requirements import Requirement
from PIL import Image

from train.config import GATES, TrainConfig
from train.data import (
    DatasetError,
    DatasetScan,
    Example,
    cover_size,
    example_buckets,
    to_rgb,
    training_data,
    upright,
    upright_size,
)

log = logging.getLogger(__name__)

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
GIB = 2**30
MEMORY_HEADROOM = 0.9
"""A trial's peak GPU memory must stay under this share of the smallest GPU's memory: the
allocator's fragmentation and a larger bucket later in the run take the rest."""
SHOWN = 5
"""Files named in a detail before `and N more`."""
LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "bentoml")


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    """PASS, WARN (works, but read the detail), FAIL (fix it before the run) or SKIP."""
    detail: str
    fix: str = ""
    """What to do about a FAIL or WARN."""


@dataclass(frozen=True)
class Gpu:
    name: str
    total: int
    """Bytes of memory."""
    free: int
    bf16: bool


class Probe:
    """What the self-test reads from the machine; tests pass one describing another machine."""

    def gpus(self) -> list[Gpu]:
        if not torch.cuda.is_available():
            return []
        found = []
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            free, total = torch.cuda.mem_get_info(index)
            bf16 = torch.cuda.is_bf16_supported() if index == 0 else found[0].bf16
            found.append(Gpu(properties.name, total, free, bf16))
        return found

    def version(self, distribution: str) -> str | None:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    def requirements(self) -> list[str]:
        """bentolora's dependency ranges: from its installed metadata, else from the
        pyproject.toml of the checkout it runs from (PYTHONPATH, no install)."""
        try:
            return importlib.metadata.requires("bentolora") or []
        except importlib.metadata.PackageNotFoundError:
            pass
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            return []
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        if not pyproject.is_file():
            return []
        project = tomllib.loads(pyproject.read_text()).get("project", {})
        extras = project.get("optional-dependencies", {})
        marked = [f'{r}; extra == "{name}"' for name, reqs in extras.items() for r in reqs]
        return list(project.get("dependencies", [])) + marked

    def free_disk(self, path: Path) -> int:
        while not path.exists() and path != path.parent:
            path = path.parent
        return shutil.disk_usage(path).free


def run_selftest(config: TrainConfig, *, gpus: int | None = None, probe: Probe | None = None):
    """Every check, in order; `gpus` is how many the run will use (None: what is visible)."""
    probe = probe or Probe()
    found = probe.gpus()
    checks = [check_devices(config, found, gpus), check_libraries(config, probe)]
    data, data_checks = check_dataset(config)
    checks += data_checks
    checks.append(check_store(config))
    # a library out of range or a missing held-out set still lets the trial show what it can
    advisory = ("libraries", "dataset: held out")
    blocked = [c.name for c in checks if c.status == FAIL and c.name not in advisory]
    if blocked:
        reason = f"not run: fix {', '.join(blocked)} first"
        names = ("disk", "training steps", "GPU memory", "render")
        return checks + [Check(name, SKIP, reason) for name in names]
    world = gpus if gpus is not None else max(1, len(found))
    return checks + trial(config, data, found, world, probe)


def failed(checks: Iterable[Check]) -> bool:
    return any(c.status == FAIL for c in checks)


def table(checks: list[Check]) -> str:
    """check | result | detail, with each fix on the line under its check."""
    width = max(len(c.name) for c in checks)
    lines = [f"{'check'.ljust(width)}  result  detail", f"{'-' * width}  ------  ------"]
    for c in checks:
        lines.append(f"{c.name.ljust(width)}  {c.status.ljust(6)}  {c.detail}")
        if c.fix:
            lines.append(f"{' ' * width}          fix: {c.fix}")
    return "\n".join(lines)


# --- devices and libraries


def check_devices(config: TrainConfig, found: list[Gpu], wanted: int | None) -> Check:
    """Enough GPUs for the processes, and one that can run the recipe's precision."""
    listed = ", ".join(
        f"{g.name} ({g.total / GIB:.1f} GiB, {g.free / GIB:.1f} free)" for g in found
    )
    if wanted and len(found) < wanted:
        return Check(
            "devices",
            FAIL,
            f"the run needs {wanted} GPUs, {len(found)} visible{': ' + listed if found else ''}",
            "run on a machine with that many GPUs (check CUDA_VISIBLE_DEVICES), or launch fewer "
            "processes and raise gradient_accumulation_steps to keep the global batch",
        )
    if not found and config.mixed_precision == "fp16":
        return Check(
            "devices", FAIL, "mixed_precision fp16 needs a CUDA GPU; none is visible",
            "run on a GPU machine, or set mixed_precision: no for a CPU run",
        )  # fmt: skip
    if not found:
        return Check(
            "devices", WARN, "no CUDA GPU: training would run on the CPU, slowly",
            "fine for the tiny base; for SDXL run on a GPU machine",
        )  # fmt: skip
    if config.mixed_precision == "bf16" and not found[0].bf16:
        return Check(
            "devices", FAIL, f"{found[0].name} cannot compute in bfloat16",
            "set mixed_precision: fp16 and import the base with the fp16-fix VAE "
            "(bentolora-models import ... --vae madebyollin/sdxl-vae-fp16-fix)",
        )  # fmt: skip
    used = found[:wanted] if wanted else found
    return Check("devices", PASS, f"{len(used)} × GPU: {listed}")


def check_libraries(config: TrainConfig, probe: Probe) -> Check:
    """Each dependency installed within bentolora's range, and the extras the recipe uses."""
    needed = {"xformers": config.attention == "xformers"}
    needed["bitsandbytes"] = config.optimizer == "adamw8bit"
    problems = []
    for line in probe.requirements():
        requirement = Requirement(line)
        extra = requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})
        if extra and not needed.get(requirement.name):
            continue
        installed = probe.version(requirement.name)
        if installed is None:
            problems.append(f"{requirement.name} is not installed")
        elif not requirement.specifier.contains(installed, prereleases=True):
            problems.append(f"{requirement.name} {installed} is not {requirement.specifier}")
    versions = ", ".join(f"{name} {probe.version(name) or '-'}" for name in LIBRARIES)
    if torch.version.cuda:
        versions += f" (CUDA {torch.version.cuda})"
    if problems:
        return Check(
            "libraries",
            FAIL,
            "; ".join(problems),
            "make install (the locked, tested set), or pip install -e '.[gpu]' for the extras",
        )
    return Check("libraries", PASS, versions)


# --- the dataset


def check_dataset(
    config: TrainConfig,
) -> tuple[tuple[DatasetScan, DatasetScan | None] | None, list[Check]]:
    """((training, held-out) scans or None, the dataset's checks)."""
    try:
        scan, held = training_data(config)
    except DatasetError as err:
        return None, [
            Check(
                "dataset",
                FAIL,
                str(err),
                "the message names the folder, file, line or column to fix (data_dir, "
                "validation_dir, the metadata file)",
            )
        ]
    everything = list(scan.examples) + (list(held.examples) if held is not None else [])
    checks = [
        Check("dataset: images", PASS, _counts(scan, held)),
        _unreadable(scan),
        _captions(scan),
        _small(everything, config),
        _duplicates(scan, held),
        _held_out(config, held),
    ]
    return (scan, held), checks


def _counts(scan: DatasetScan, held: DatasetScan | None) -> str:
    relative = [Path(scan.relative(e)) for e in scan.examples]
    per_folder = Counter(path.parts[0] if len(path.parts) > 1 else "(top)" for path in relative)
    folders = ", ".join(f"{name}: {n}" for name, n in sorted(per_folder.items()))
    held_part = f", {len(held.examples)} held out" if held is not None else ", none held out"
    return f"{len(scan.examples)} to train{held_part} in {scan.root} (per folder: {folders})"


def _named(paths: list[str]) -> str:
    more = f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else ""
    return "; ".join(paths[:SHOWN]) + more


def _skipped(scan: DatasetScan, caption: bool) -> list[str]:
    return [
        f"{s.path}: {s.reason}"
        for s in scan.skipped
        if s.reason.startswith("no caption") == caption
    ]


def _unreadable(scan: DatasetScan) -> Check:
    bad = _skipped(scan, caption=False)
    if not bad:
        return Check("dataset: readable", PASS, "every image decodes completely")
    return Check(
        "dataset: readable",
        FAIL,
        f"{len(bad)} unreadable, truncated or missing: {_named(bad)}",
        "re-export each (open and save it again) or delete it; training would skip it",
    )


def _captions(scan: DatasetScan) -> Check:
    bad = _skipped(scan, caption=True)
    if not bad:
        return Check("dataset: captions", PASS, "every image has a caption")
    return Check(
        "dataset: captions",
        FAIL,
        f"{len(bad)} images without a caption: {_named(bad)}",
        "write one for each (a.txt beside a.png, or its row in metadata.jsonl / .csv); "
        "training would skip them",
    )


def _small(examples: list[Example], config: TrainConfig) -> Check:
    """Images that would be enlarged to reach their training size (blurred, not detailed)."""
    buckets = example_buckets(examples, config)
    small = []
    for example, bucket in zip(examples, buckets, strict=True):
        with Image.open(example.path) as image:
            width, height = upright_size(image)
        if cover_size(width, height, bucket)[0] > width:
            small.append(f"{example.path} ({width}×{height} < {bucket.width}×{bucket.height})")
    if not small:
        return Check("dataset: sizes", PASS, "every image covers its training size unenlarged")
    return Check(
        "dataset: sizes",
        FAIL,
        f"{len(small)} images smaller than their training size: {_named(small)}",
        f"replace them with larger photos or delete them, or lower resolution ({config.resolution})",
    )


def _duplicates(scan: DatasetScan, held: DatasetScan | None) -> Check:
    """Groups of images with the same bytes or the same upright pixels, held-out ones included."""
    examples = list(scan.examples) + (list(held.examples) if held is not None else [])
    groups: dict[str, list[Path]] = {}
    for example in examples:
        with Image.open(example.path) as image:
            pixels = np.asarray(to_rgb(upright(image)))
        key = hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()
        groups.setdefault(key, []).append(example.path)
    same = [" = ".join(str(p) for p in paths) for paths in groups.values() if len(paths) > 1]
    if not same:
        return Check("dataset: duplicates", PASS, "no two images have the same pixels")
    return Check(
        "dataset: duplicates",
        FAIL,
        f"{len(same)} groups of identical images: {_named(same)}",
        "delete all but one of each group (a copy trains twice as often, and one in the held-out "
        "set flatters the evaluation)",
    )


def _held_out(config: TrainConfig, held: DatasetScan | None) -> Check:
    """The held-out images the recipe's gate thresholds need (fid_clip needs 2 or more)."""
    gated = [f for f in GATES if getattr(config, f)]
    count = len(held.examples) if held is not None else 0
    need = 2 if config.gate_max_fid_clip else 1
    if gated and count < need:
        return Check(
            "dataset: held out",
            FAIL,
            f"{', '.join(gated)} set, but {count} images are held out (need {need} or more)",
            "set validation_split (0.1 holds out one image in ten) or validation_dir, or pass "
            "--prompts and --reference to evaluate",
        )
    if not count:
        return Check(
            "dataset: held out", WARN, "no images held out: evaluate needs --prompts",
            "set validation_split: 0.1 to judge the adapter on photos it never saw",
        )  # fmt: skip
    return Check("dataset: held out", PASS, f"{count} images for evaluate's reference")


# --- the store


def check_store(config: TrainConfig) -> Check:
    from models.bases import get_base
    from models.clip import KIND as CLIP_KIND
    from models.store import StoreError, get_entry, store_root

    try:
        base = get_base(config.base)
    except StoreError as err:
        return Check(
            "store", FAIL, str(err),
            "import the base: bentolora-models import <hub id, folder or .safetensors> --name "
            f"{config.base.split(':')[0]} (or bentolora-models build-tiny for sdxl-tiny)",
        )  # fmt: skip
    if config.validation_clip:
        try:
            get_entry(config.validation_clip, kind=CLIP_KIND)
        except StoreError as err:
            return Check("store", FAIL, str(err), "bentolora-models import-clip ... --name "
                         f"{config.validation_clip}, or remove validation_clip")  # fmt: skip
    root = store_root()
    writable = root if root.exists() else root.parent
    if not os.access(writable, os.W_OK):
        return Check("store", FAIL, f"{writable} is not writable", "fix its permissions or "
                     "point BENTOML_HOME at a writable folder")  # fmt: skip
    return Check("store", PASS, f"base {base.tag}; store {root}")


# --- the trial: setup, disk, two steps, memory, render


def trial(
    config: TrainConfig,
    data: tuple[DatasetScan, DatasetScan | None],
    found: list[Gpu],
    world: int,
    probe: Probe,
) -> list[Check]:
    """The recipe's run for two steps and one render, in a temporary folder."""
    from train.loop import setup

    with tempfile.TemporaryDirectory(prefix="selftest-") as folder:
        short = trial_config(config, folder)
        if found:
            torch.cuda.reset_peak_memory_stats()
        try:
            run = setup(short)
        except Exception as err:  # noqa: BLE001 - whatever stops the setup is the finding
            return [_trial_error("setup", err, config)] + [
                Check(n, SKIP, "not run: the setup failed")
                for n in ("disk", "training steps", "GPU memory", "render")
            ]
        checks = [check_disk(config, run, probe)]
        checks += _steps_and_render(run, config, found, world)
    return checks


def trial_config(config: TrainConfig, folder: str) -> TrainConfig:
    """The recipe for two steps and one render into `folder`: nothing stored, no checkpoints."""
    return dataclasses.replace(
        config,
        output_dir=folder,
        max_steps=2,
        checkpoint_every=0,
        validation_every=0,
        validation_prompts=config.validation_prompts[:1] or ("a photo",),
        validation_loss_examples=1,
        tensorboard=False,
        store=False,
        resume="",
    )


def check_disk(config: TrainConfig, run, probe: Probe) -> Check:
    """Free space at output_dir for the checkpoints, final weights and validation images, and at
    cache_dir for the cache, twice over."""
    lora_bytes = sum(p.numel() for p in run.params) * 4
    kept = config.keep_checkpoints + 1 if config.checkpoint_every else 0  # a new one, then prune
    runs = lora_bytes * 3 * kept + lora_bytes * 2 + 50 * 2**20  # weights + 2 Adam moments
    side = config.resolution // 8
    per_example = 8 * side * side * 4 * (2 if config.flip else 1) + (77 * 2048 + 1280) * 4
    cache = per_example * len(run.scan.examples)
    checks = [(Path(config.output_dir), runs), (Path(config.cache_dir), cache)]
    short = []
    for path, need in checks:
        free = probe.free_disk(path.resolve())
        if free < 2 * need:
            short.append(f"{path}: {free / GIB:.2f} GiB free, {2 * need / GIB:.2f} GiB wanted")
    detail = (
        f"run folder ≈ {runs / 2**20:.1f} MiB ({config.keep_checkpoints if kept else 0} "
        f"checkpoints of {lora_bytes * 3 / 2**20:.1f} MiB, weights, report), "
        f"cache ≈ {cache / 2**20:.1f} MiB"
    )
    if short:
        return Check("disk", FAIL, f"{detail}; too little: {'; '.join(short)}",
                     "free space there, or point output_dir / cache_dir at a larger disk")  # fmt: skip
    return Check("disk", PASS, detail)


def _steps_and_render(run, config: TrainConfig, found: list[Gpu], world: int) -> list[Check]:
    from train.loop import fit, lora_dropout_off, render

    started = time.time()
    try:
        loss = fit(run)
    except Exception as err:  # noqa: BLE001
        return [
            _trial_error("training steps", err, config),
            _memory(found, _peak(found)),
            Check("render", SKIP, "not run: the training steps failed"),
        ]
    per_step = (time.time() - started) / 2
    total = config.total_steps(len(run.scan.examples), world)
    steps = Check(
        "training steps",
        PASS,
        f"2 steps of {config.global_batch(1)} examples at {config.resolution}², loss {loss:.4f}, "
        f"{per_step:.2f} s/step: the recipe's {total} steps ≈ {_duration(per_step * total)} "
        f"on {world} process{'es' if world > 1 else ''} (first steps include warm-up)",
    )
    started = time.time()
    try:
        with lora_dropout_off(run):
            [path] = render(run, 2)
    except Exception as err:  # noqa: BLE001
        return [steps, _memory(found, _peak(found)), _trial_error("render", err, config)]
    memory = _memory(found, _peak(found))
    return [steps, memory, _image(path, config, time.time() - started)]


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    return f"{minutes / 60:.1f} h" if minutes >= 90 else f"{minutes:.0f} min"


def _peak(found: list[Gpu]) -> int:
    return torch.cuda.max_memory_allocated() if found else 0


def _memory(found: list[Gpu], peak: int) -> Check:
    """The trial's peak GPU memory against the smallest GPU's (every process holds as much)."""
    if not found:
        return Check("GPU memory", SKIP, "no GPU")
    smallest = min(g.total for g in found)
    detail = f"peak {peak / GIB:.1f} GiB of the smallest GPU's {smallest / GIB:.1f} GiB"
    if peak > MEMORY_HEADROOM * smallest:
        return Check("GPU memory", FAIL, detail + f" (over {MEMORY_HEADROOM:.0%})", MEMORY_FIX)
    return Check("GPU memory", PASS, detail)


MEMORY_FIX = (
    "gradient_checkpointing: true; or lower batch_size and raise gradient_accumulation_steps "
    "(the same global batch trains the same); or mixed_precision: bf16"
)


def _image(path: Path, config: TrainConfig, seconds: float) -> Check:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    detail = (
        f"{config.resolution}² in {config.validation_inference_steps} steps, {seconds:.1f} s "
        f"(mean {pixels.mean():.0f}, spread {pixels.std():.1f})"
    )
    if pixels.std() < 1.0:
        return Check(
            "render", FAIL, f"{detail}: one flat colour (NaNs in the VAE come out black)",
            "in fp16, import the base with the fp16-fix VAE (--vae madebyollin/sdxl-vae-fp16-fix) "
            "or train in bf16",
        )  # fmt: skip
    return Check("render", PASS, detail)


def _trial_error(name: str, err: BaseException, config: TrainConfig) -> Check:
    if isinstance(err, torch.OutOfMemoryError):
        detail = f"out of GPU memory at batch_size {config.batch_size}, {config.resolution}²"
        return Check(name, FAIL, detail, MEMORY_FIX)
    log.debug("selftest %s failed", name, exc_info=err)
    return Check(name, FAIL, f"{type(err).__name__}: {err}", _fix_for(err))


def _fix_for(err: BaseException) -> str:
    from train.loop import TrainingError

    if isinstance(err, TrainingError):
        return "as the message says; the recipe would stop the same way"
    return "run `python -m train --config ... --max-steps 2 --no-store` to see the whole error"

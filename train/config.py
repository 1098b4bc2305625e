"""The training configuration: one typed dataclass, documented field by field, checked as a whole.

Each field's docstring is its `--help` text. `__post_init__` reports every problem at once;
derived values are methods, so a config is never changed after it is made.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from models.pipeline_speed import COMPILE_MODES

PREDICTION_TYPES = ("epsilon", "v_prediction")
SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("auto", "adamw", "adamw8bit")
CROPS = ("center", "random")
ATTENTION = ("sdpa", "xformers")
CHECKPOINT_BLOCK = re.compile(r"all|mid_block|(down|up)_blocks(\.\d+)?")
"""A checkpoint_blocks entry: a UNet block's module name, one side of the UNet, or all."""
VALIDATION_SEED = 1234
"""Validation image i of a run is drawn from seed VALIDATION_SEED + i (every validation, so the
images compare across steps); `python -m train evaluate` starts from the same seed."""


class ConfigError(ValueError):
    """One or more configuration values are not allowed; the message lists them all."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs. YAML files in configs/ set these fields."""

    # --- what to train on
    base: str = "sdxl-tiny"
    """Model-store tag of the SDXL base (import one with `bentolora-models import`)."""
    data_dir: str = ""
    """Dataset folder: images with .txt captions beside them, or metadata.jsonl / metadata.csv."""
    caption_column: str = "text"
    """Caption column of metadata.jsonl / metadata.csv."""
    image_column: str = "file_name"
    """Image path column of metadata.jsonl / metadata.csv."""
    name: str = ""
    """Adapter name: it is stored as `lora-<name>`."""
    output_dir: str = "runs"
    """Runs are written to <output_dir>/<name>: checkpoints, metrics, validation images."""
    cache_dir: str = "runs/cache"
    """Where cached latents and text embeddings live; reused by any run on the same base and data."""
    validation_split: float = 0.0
    """Fraction of data_dir's images held out of training, in [0, 1): round(fraction × images), at
    least one, ranked by a hash of each file's relative path (the same images every run; identical
    files stay on one side). `python -m train evaluate` uses them as its reference. 0: none."""
    validation_dir: str = ""
    """A separate folder of held-out images with captions (the layouts of data_dir), never trained
    on; `python -m train evaluate` uses them as its reference. Instead of validation_split."""

    # --- preprocessing
    resolution: int = 1024
    """Training side length in pixels (the square bucket); a multiple of 8."""
    bucketing: bool = False
    """Aspect-ratio bucketing: each image goes to the bucket of about resolution² pixels closest to its shape."""
    bucket_step: int = 64
    """Bucket sides are multiples of this many pixels (a multiple of 8)."""
    crop: str = "center"
    """How an image is cut to its bucket after resizing: center or random (random needs cache_latents: false)."""
    flip: bool = False
    """Mirror images horizontally at random (p=0.5); both variants are cached."""
    cache_latents: bool = True
    """Encode images with the VAE once, to disk, so the VAE need not stay in GPU memory."""
    cache_text_embeddings: bool = True
    """Encode captions once, to disk (not possible with text_encoder_lora)."""

    # --- loss
    prediction_type: str = ""
    """epsilon or v_prediction; empty takes the base scheduler's own."""
    snr_gamma: float = 5.0
    """Min-SNR-γ loss weighting (Hang et al. 2023); 0 turns it off."""
    noise_offset: float = 0.0
    """Offset noise strength (0.0357 is the usual SDXL value); 0 turns it off."""

    # --- LoRA
    rank: int = 16
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the LoRA path, in [0, 1)."""
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """UNet layers that get LoRA (names as in diffusers' attention processors)."""
    text_encoder_lora: bool = False
    """Also train LoRA on both text encoders (their outputs are then not cached)."""
    text_encoder_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    """Text-encoder layers that get LoRA when text_encoder_lora is on."""

    # --- optimisation
    optimizer: str = "auto"
    """adamw, adamw8bit (needs bitsandbytes) or auto (8-bit when bitsandbytes and CUDA are present)."""
    learning_rate: float = 1e-4
    """Peak learning rate."""
    adam_beta1: float = 0.9
    """AdamW β1."""
    adam_beta2: float = 0.999
    """AdamW β2."""
    weight_decay: float = 1e-2
    """AdamW decoupled weight decay."""
    adam_epsilon: float = 1e-8
    """AdamW ε."""
    lr_scheduler: str = "constant"
    """Learning-rate schedule: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial."""
    warmup_steps: int = 0
    """Linear warm-up steps before the schedule."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this; 0 turns clipping off."""
    batch_size: int = 1
    """Images per device per micro-step."""
    gradient_accumulation_steps: int = 1
    """Micro-steps summed into one optimizer step."""
    epochs: int = 1
    """Passes over the dataset (ignored when max_steps is set)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 derives it from epochs."""
    mixed_precision: str = "no"
    """no, fp16 or bf16: frozen weights in that dtype, LoRA weights and optimizer in float32."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass: less memory, about 30% slower (with all
    blocks; checkpoint_blocks picks which)."""
    checkpoint_blocks: tuple[str, ...] = ("all",)
    """With gradient_checkpointing, the UNet blocks that recompute, by diffusers module name:
    down_blocks.N, mid_block, up_blocks.N, a whole side (down_blocks, up_blocks) or all. The
    others keep their activations: memory between none and all, less recompute. The up blocks
    (three layers per level to the down blocks' two) hold the most activations."""
    compile: str = "off"
    """torch.compile the UNet for training: off; blocks (regional: each transformer and ResNet
    block, each kind compiled once per shape); unet (the whole UNet, longer to compile). The first
    steps are slow while it compiles; validation runs eager. Kernels are cached in
    TORCHINDUCTOR_CACHE_DIR (default /tmp/torchinductor_<user>): set it to a kept folder to reuse
    them across runs."""
    attention: str = "sdpa"
    """Attention backend: sdpa (PyTorch's) or xformers (optional extra, GPU only)."""
    seed: int = 0
    """Seed of everything random: data order, noise, timesteps, dropout, LoRA init."""

    # --- checkpoints, validation, logs
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N optimizer steps; 0 saves none."""
    keep_checkpoints: int = 3
    """Keep the newest K checkpoints (at least 2 when checkpointing)."""
    resume: str = ""
    """Resume from `latest` or a checkpoint folder; empty starts fresh."""
    validation_prompts: tuple[str, ...] = ()
    """Prompts rendered at every validation (fixed seeds, so runs compare)."""
    validation_every: int = 0
    """Render validation prompts every N steps (and always at the end); 0 only at the end."""
    validation_inference_steps: int = 25
    """Denoising steps of validation images."""
    validation_guidance: float = 5.0
    """Classifier-free guidance scale of validation images."""
    validation_clip: str = ""
    """Store tag of a CLIP model scoring validation images against their prompts (the report's
    CLIP curve); empty: no CLIP score."""
    validation_loss_examples: int = 8
    """Examples in the fixed-noise validation loss (the same noise and timesteps every time)."""
    log_every: int = 1
    """Write a metrics line every N optimizer steps."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device at the training precision (989 for an H100 SXM in bf16):
    the log then shows MFU, achieved TFLOP/s over this. 0: TFLOP/s only."""
    tensorboard: bool = True
    """Also log to TensorBoard when it is installed."""
    store: bool = True
    """Save the final adapter into the model store (off for dry runs)."""

    # --- the quality gate of `python -m train evaluate --promote` (read from the stored adapter)
    gate_max_fid_clip: float = 0.0
    """--promote refuses an adapter whose fid_clip on the held-out images is not below this; 0: no
    threshold. fid_clip is FID on CLIP features, not Inception's: calibrate, do not copy papers."""
    gate_min_ssim: float = 0.0
    """--promote refuses an adapter whose SSIM against the held-out images is not above this, in
    [0, 1); 0: no threshold."""
    gate_max_lpips_clip: float = 0.0
    """--promote refuses an adapter whose lpips_clip against the held-out images is not below
    this; 0: no threshold. lpips_clip is an unlearned LPIPS on CLIP features, not AlexNet LPIPS."""

    def __post_init__(self) -> None:
        problems = list(self._type_problems()) or list(self._problems())
        if problems:
            raise ConfigError("invalid training config:\n  - " + "\n  - ".join(problems))

    def _type_problems(self):
        checks = {"int": int, "float": (int, float), "bool": bool, "str": str}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type.startswith("tuple"):
                ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
                want = "a list of strings"
            else:
                expected = checks[f.type]
                ok = isinstance(value, expected) and (
                    f.type == "bool" or not isinstance(value, bool)
                )
                want = {
                    "int": "an integer",
                    "float": "a number",
                    "bool": "true or false",
                    "str": "a string",
                }[f.type]
            if not ok:
                yield f"{f.name}: {value!r} is not {want}"

    def _problems(self):
        yield from self._missing_problems()
        yield from self._choice_problems()
        yield from self._count_problems()
        yield from self._value_problems()
        yield from self._speed_problems()
        yield from self._evaluation_problems()

    def _missing_problems(self):
        if not self.data_dir:
            yield "data_dir: required (a folder of images with captions)"
        if not self.name:
            yield "name: required (the adapter is stored as lora-<name>)"
        else:
            from models.store import NAME_PATTERN, NAME_RULE

            if not NAME_PATTERN.match(self.name):
                yield f"name: {self.name!r} is not allowed; use {NAME_RULE}"
        if not self.target_modules:
            yield "target_modules: at least one layer name"

    def _choice_problems(self):
        for key, value, allowed in (
            ("crop", self.crop, CROPS),
            ("lr_scheduler", self.lr_scheduler, SCHEDULERS),
            ("mixed_precision", self.mixed_precision, MIXED_PRECISION),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("attention", self.attention, ATTENTION),
            ("compile", self.compile, COMPILE_MODES),
            ("prediction_type", self.prediction_type, ("",) + PREDICTION_TYPES),
        ):
            if value not in allowed:
                yield f"{key}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}"
        if self.crop == "random" and self.cache_latents:
            yield "crop: random needs cache_latents: false (cached latents fix the crop)"
        if self.text_encoder_lora and self.cache_text_embeddings:
            yield "text_encoder_lora: needs cache_text_embeddings: false (trained encoders change the embeddings)"

    def _count_problems(self):
        for key in ("resolution", "bucket_step"):
            if getattr(self, key) <= 0 or getattr(self, key) % 8:
                yield f"{key}: {getattr(self, key)} must be a positive multiple of 8"
        for key in (
            "rank",
            "batch_size",
            "gradient_accumulation_steps",
            "epochs",
            "log_every",
            "validation_inference_steps",
            "validation_loss_examples",
        ):
            if getattr(self, key) < 1:
                yield f"{key}: {getattr(self, key)} must be at least 1"
        for key in ("max_steps", "warmup_steps", "checkpoint_every", "validation_every", "seed"):
            if getattr(self, key) < 0:
                yield f"{key}: {getattr(self, key)} must be 0 or more"
        if self.checkpoint_every and self.keep_checkpoints < 2:
            yield f"keep_checkpoints: {self.keep_checkpoints} must be at least 2 (a crash mid-write must leave one)"

    def _value_problems(self):
        for key in ("snr_gamma", "noise_offset", "max_grad_norm", "weight_decay", "adam_epsilon"):
            if not getattr(self, key) >= 0:
                yield f"{key}: {getattr(self, key)} must be 0 or more"
        if self.alpha <= 0:
            yield f"alpha: {self.alpha} must be positive"
        if not 0 <= self.dropout < 1:
            yield f"dropout: {self.dropout} must be in [0, 1)"
        if not self.learning_rate > 0:
            yield f"learning_rate: {self.learning_rate} must be positive"
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            yield "adam_beta1, adam_beta2: must be in [0, 1)"

    def _evaluation_problems(self):
        if not 0 <= self.validation_split < 1:
            yield f"validation_split: {self.validation_split} must be in [0, 1)"
        if self.validation_split and self.validation_dir:
            yield "validation_split, validation_dir: set one of them (a split of data_dir or a folder)"
        for key in ("gate_max_fid_clip", "gate_max_lpips_clip"):
            if not getattr(self, key) >= 0:
                yield f"{key}: {getattr(self, key)} must be 0 (no threshold) or more"
        if not 0 <= self.gate_min_ssim < 1:
            yield f"gate_min_ssim: {self.gate_min_ssim} must be in [0, 1) (0: no threshold)"

    def _speed_problems(self):
        if not self.checkpoint_blocks:
            yield "checkpoint_blocks: at least one block (or all)"
        bad = [b for b in self.checkpoint_blocks if not CHECKPOINT_BLOCK.fullmatch(b)]
        if bad:
            yield (
                f"checkpoint_blocks: {', '.join(repr(b) for b in bad)} not understood; use "
                "down_blocks.N, mid_block, up_blocks.N, down_blocks, up_blocks or all"
            )
        elif self.checkpoint_blocks != ("all",) and not self.gradient_checkpointing:
            yield "checkpoint_blocks: needs gradient_checkpointing: true"
        if not self.peak_tflops >= 0:
            yield f"peak_tflops: {self.peak_tflops} must be 0 (unknown) or more"

    # --- derived values
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def global_batch(self, world_size: int = 1) -> int:
        """Examples per optimizer step: batch_size × gradient_accumulation_steps × processes."""
        return self.batch_size * self.gradient_accumulation_steps * world_size

    def total_steps(self, examples: int, world_size: int = 1) -> int:
        """Optimizer steps for the run: max_steps, or epochs over `examples` split across devices."""
        if self.max_steps:
            return self.max_steps
        return max(1, self.epochs * -(-examples // self.global_batch(world_size)))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    def fingerprint(self, *, exclude: tuple[str, ...] = ()) -> str:
        """Hash of the settings that shape the result (resuming checks it). Fields in ADDED_LATER
        count only when set, so a checkpoint written before they existed still resumes."""
        data = {
            k: v
            for k, v in self.to_dict().items()
            if k not in exclude
            and not (k in ADDED_LATER and v == TrainConfig.__dataclass_fields__[k].default)
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


RUNTIME_ONLY = (
    "resume",
    "store",
    "tensorboard",
    "log_every",
    "output_dir",
    "cache_dir",
    "validation_clip",
    "checkpoint_blocks",
    "compile",
    "peak_tflops",
    "gate_max_fid_clip",
    "gate_min_ssim",
    "gate_max_lpips_clip",
)
"""Fields that do not change what a run computes: a resumed run may differ in these.

checkpoint_blocks, compile and peak_tflops change speed, memory and float rounding, not the
result. (So would gradient_checkpointing; it stays in the fingerprint so that checkpoints written
before these fields existed still resume.) The gate thresholds are read by evaluate, not training."""
ADDED_LATER = ("validation_split", "validation_dir")
"""Fields that change what a run computes but were added after checkpoints had been written."""
GATES = {
    "gate_max_fid_clip": ("fid_clip", "<"),
    "gate_min_ssim": ("ssim", ">"),
    "gate_max_lpips_clip": ("lpips_clip", "<"),
}
"""Each gate field: the evaluation metric it bounds, and how that metric must compare with it."""


def from_dict(data: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """Build a config from a mapping, refusing unknown keys with a suggestion."""
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = [k for k in data if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(hints)}; run with --help for the list"
        )
    values = {}
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for key, value in data.items():
        if "tuple" in str(types[key]) and isinstance(value, list | tuple):
            value = tuple(value)
        elif "tuple" in str(types[key]) and isinstance(value, str):
            value = tuple(v for v in (s.strip() for s in value.split(",")) if v)
        values[key] = value
    try:
        return TrainConfig(**values)
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_yaml(path: str | Path, *, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML recipe into a plain mapping (checked later, with the CLI overrides).

    A recipe may start from another: `extends: other.yaml` (a path relative to the recipe) takes
    every value of that recipe, and the recipe's own values replace them key by key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of option: value")
    if "extends" not in data:
        return data
    parent = data.pop("extends")
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{path}: extends: {parent!r} must name a recipe file")
    parent_path = path.parent / parent
    if parent_path.resolve() in (*_seen, path.resolve()):
        raise ConfigError(f"{path}: extends {parent} makes a loop of recipes")
    try:
        values = load_yaml(parent_path, _seen=(*_seen, path.resolve()))
    except ConfigError as err:
        raise ConfigError(f"{path}: extends {parent}: {err}") from None
    return {**values, **data}


def field_docs() -> dict[str, str]:
    """Each field's docstring, read from the source (the one place options are documented)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(TrainConfig))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            if isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = nxt.value.value  # type: ignore[union-attr]
    return docs


__all__ = [
    "ConfigError",
    "TrainConfig",
    "field_docs",
    "from_dict",
    "load_yaml",
    "RUNTIME_ONLY",
    "VALIDATION_SEED",
]

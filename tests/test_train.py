"""Training end to end on the tiny base: it learns, it stores a diffusers-readable adapter, it refuses bad input."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from models.adapter import (
    apply_adapters,
    get_adapter,
    list_adapters,
    load_adapter_weights,
    weights_path,
)
from models.loading import load_pipeline
from models.store import StoreError
from tests.store_helpers import bentoml_models
from train.config import VALIDATION_SEED, TrainConfig
from train.data import DatasetError
from train.loop import TrainingError, TrainResult, train
from train.metrics import read_metrics

PROMPT = "a red circle on a blue background"
# Attention-only LoRA on a random-weight UNet can barely move the loss; adding the input/output
# convolutions and projections lets 60 steps overfit 8 images clearly (1.12 -> ~0.2).
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv_in", "conv_out", "proj_in", "proj_out")


def config_for(sample_dir, tmp_path, **changes) -> TrainConfig:
    values = dict(
        base="sdxl-tiny",
        data_dir=str(sample_dir),
        name="overfit",
        output_dir=str(tmp_path / "runs"),
        cache_dir=str(tmp_path / "cache"),
        resolution=64,
        rank=4,
        alpha=4.0,
        learning_rate=5e-3,
        target_modules=TARGETS,
        batch_size=4,
        max_steps=60,
        validation_prompts=(PROMPT,),
        validation_inference_steps=4,
        validation_every=30,
        checkpoint_every=0,
        tensorboard=True,
    )
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def trained(tiny_base, sample_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overfit")
    config = config_for(sample_dir, tmp)
    return config, train(config)


def render(pipe, seed=7, steps=4) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images[0]


def assert_diffusers_reproduces(base, entry, run_dir, step: int) -> StableDiffusionXLPipeline:
    """Stock diffusers with the stored file renders the validation image the trainer made in memory."""
    pipe = StableDiffusionXLPipeline.from_pretrained(base.path)
    pipe.load_lora_weights(str(entry.path), weight_name="pytorch_lora_weights.safetensors")
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(VALIDATION_SEED),
    ).images[0]
    rendered = Image.open(run_dir / "validation" / f"step-{step:08d}" / "00.png")
    diff = np.abs(np.asarray(image, dtype=int) - np.asarray(rendered, dtype=int))
    # Both are 8-bit PNGs of the same float computation; allow one level of rounding.
    assert diff.max() <= 1, diff.max()
    return pipe


def test_overfitting_lowers_the_fixed_noise_loss(trained):
    _, result = trained
    before = result.validation["fixed_noise_loss_base"]
    after = result.validation["fixed_noise_loss"]
    assert after < 0.5 * before, (before, after)


def test_adapter_lands_in_the_store_with_its_metadata(trained, tiny_base, sample_dir):
    config, result = trained
    entry = get_adapter("overfit")
    assert entry.tag == result.tag
    meta = entry.metadata
    assert meta["base_tag"] == tiny_base.tag
    assert meta["base_hash"] == tiny_base.metadata["content_hash"]
    assert (meta["rank"], meta["alpha"], meta["dropout"]) == (4, 4.0, 0.0)
    assert meta["target_modules"] == list(TARGETS)
    assert meta["text_encoder_lora"] is False
    assert meta["training_config"]["learning_rate"] == 5e-3
    assert meta["dataset"]["fingerprint"] and meta["dataset"]["examples"] == 8
    assert meta["steps"] == 60 and np.isfinite(meta["final_loss"])
    assert meta["validation"]["fixed_noise_loss"] == result.validation["fixed_noise_loss"]
    assert meta["wall_time_s"] > 0
    state = load_adapter_weights(weights_path(entry))
    assert all(k.startswith("unet.") for k in state) and any("lora_A" in k for k in state)


def test_metrics_and_validation_images_are_written(trained):
    config, result = trained
    records = read_metrics(config.run_dir())
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 61))
    assert all({"lr", "it_s", "images_s", "grad_norm", "peak_memory_gb"} <= set(r) for r in steps)
    validation = {r["step"]: r["validation_loss"] for r in records if "validation_loss" in r}
    # The base's loss is the curve's first point, so the report shows where training started.
    assert validation[0] == result.validation["fixed_noise_loss_base"]
    assert validation[60] == result.validation["fixed_noise_loss"]
    for step in (30, 60):
        image = Image.open(config.run_dir() / "validation" / f"step-{step:08d}" / "00.png")
        assert image.size == (64, 64)
    assert any((config.run_dir() / "tensorboard").iterdir())


def test_plain_diffusers_reproduces_the_trained_model(trained, tiny_base):
    """The stored file, read by stock diffusers, gives the image the trainer rendered in memory."""
    config, result = trained
    entry = get_adapter(result.tag)
    pipe = assert_diffusers_reproduces(tiny_base, entry, config.run_dir(), step=60)
    assert pipe.get_list_adapters().keys() == {"unet"}


def test_project_loader_matches_plain_diffusers_and_scale_zero_is_the_base(trained, tiny_base):
    _, result = trained
    entry = get_adapter(result.tag)
    plain = StableDiffusionXLPipeline.from_pretrained(tiny_base.path)
    base_image = render(plain)
    plain.load_lora_weights(str(entry.path), weight_name="pytorch_lora_weights.safetensors")
    plain_image = render(plain)

    ours = load_pipeline("sdxl-tiny")
    apply_adapters(ours, [(entry, 1.0)], base=tiny_base)
    ours_image = render(ours)
    assert np.abs(ours_image - plain_image).max() < 1e-5
    assert np.abs(ours_image - base_image).max() > 1e-2  # the adapter changes the image

    apply_adapters(ours, [(entry, 0.0)], base=tiny_base)
    assert np.abs(render(ours) - base_image).max() < 1e-5


def test_cache_is_reused_and_invalidated_by_data_changes(tiny_base, sample_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    config = config_for(
        data, tmp_path, name="cache-check", max_steps=2, validation_prompts=(), store=False
    )
    train(config)
    folders = lambda: sorted(p.name for p in (tmp_path / "cache").iterdir())  # noqa: E731
    first = folders()
    assert len(first) == 1
    mtimes = {
        p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / first[0]).glob("*.safetensors")
    }
    train(config)
    assert folders() == first
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # read, not rewritten
    caption = next(data.glob("*.txt"))
    caption.write_text(caption.read_text() + " with a new word")
    train(config)
    assert len(folders()) == 2


def test_bad_images_are_skipped_and_counted(tiny_base, sample_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    (data / "broken.png").write_bytes(b"not a png at all")
    (data / "broken.txt").write_text("a broken image")
    (data / "uncaptioned.png").write_bytes(next(data.glob("*.png")).read_bytes())
    result = train(config_for(data, tmp_path, name="skips", max_steps=1, validation_prompts=()))
    dataset = get_adapter(result.tag).metadata["dataset"]
    assert dataset["examples"] == 8 and dataset["skipped"] == 2


def test_missing_and_empty_data_folders_stop_with_the_path(tiny_base, tmp_path):
    stored = {m["tag"] for m in bentoml_models("list")}  # the store as BentoML reads it
    with pytest.raises(DatasetError, match="missing"):
        train(config_for(tmp_path / "missing", tmp_path, name="nodata"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        train(config_for(tmp_path / "empty", tmp_path, name="nodata"))
    assert {m["tag"] for m in bentoml_models("list")} == stored  # nothing was stored


def test_unknown_base_stops_and_lists_the_store(sample_dir, tmp_path, tiny_base):
    with pytest.raises(StoreError, match="'sdxl-nope' is not in the model store.*sdxl-tiny"):
        train(config_for(sample_dir, tmp_path, base="sdxl-nope", name="nobase"))


def test_nan_loss_stops_the_run_and_stores_nothing(tiny_base, sample_dir, tmp_path):
    config = config_for(
        sample_dir,
        tmp_path,
        name="diverges",
        learning_rate=1e30,
        max_grad_norm=0.0,
        max_steps=40,
        validation_prompts=(),
    )
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at step \d+"):
        train(config)
    assert all(e.name != "lora-diverges" for e in list_adapters())


@pytest.fixture(scope="module")
def options_data(sample_dir, tmp_path_factory):
    """The sample dataset plus a 2:1 and a 1:2 image, so bucketing has shapes to change."""
    data = tmp_path_factory.mktemp("options") / "data"
    shutil.copytree(sample_dir, data)
    for i, size in enumerate([(96, 48), (48, 96)]):
        Image.new("RGB", size, (200, 30, 30)).save(data / f"wide{i}.png")
        (data / f"wide{i}.txt").write_text("a red rectangle")
    return data


def options_config(data, tmp_path, **changes) -> TrainConfig:
    return config_for(data, tmp_path, max_steps=3, validation_prompts=(), **changes)


@dataclass
class OptionRun:
    """What one run of the options test left: its result, weights, metrics and cache."""

    result: TrainResult
    weights: dict[str, torch.Tensor]
    records: list[dict]
    cache: Path
    """The run's one latent/embedding cache folder."""
    log: str

    def changed_from(self, other: OptionRun) -> bool:
        """Whether any UNet LoRA tensor differs from `other`'s."""
        unet = [k for k in other.weights if k.startswith("unet.")]
        return any(not torch.equal(self.weights[k], other.weights[k]) for k in unet)

    def manifest(self) -> dict:
        return json.loads((self.cache / "manifest.json").read_text())

    def series(self, key: str = "loss") -> list[float]:
        return [r[key] for r in self.records if key in r]


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def option_run(config: TrainConfig) -> OptionRun:
    """Train with `config`, keeping what `train`'s modules log at INFO."""
    logger, handler = logging.getLogger("train"), _Lines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        result = train(config)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    weights = load_adapter_weights(result.run_dir / "final" / "pytorch_lora_weights.safetensors")
    (cache,) = Path(config.cache_dir).iterdir()
    records = read_metrics(config.run_dir())
    return OptionRun(result, weights, records, cache, "\n".join(handler.lines))


@pytest.fixture(scope="module")
def default_run(tiny_base, options_data, tmp_path_factory):
    """The options test's run with every option at its default."""
    tmp = tmp_path_factory.mktemp("options-default")
    return option_run(options_config(options_data, tmp, name="options-default"))


def check_te_lora(run: OptionRun, default: OptionRun) -> None:
    assert {k.split(".", 1)[0] for k in run.weights} == {"unet", "text_encoder", "text_encoder_2"}
    for encoder in ("text_encoder", "text_encoder_2"):
        ups = [v for k, v in run.weights.items() if k.startswith(f"{encoder}.") and "lora_B" in k]
        assert any(v.abs().max() > 0 for v in ups), encoder  # B starts at 0: it was trained
    assert run.changed_from(default)


def check_rank(run: OptionRun, default: OptionRun) -> None:
    downs = [v for k, v in run.weights.items() if "lora_A" in k]
    assert downs and all(v.shape[0] == 2 for v in downs)
    assert all(v.shape[0] == 4 for k, v in default.weights.items() if "lora_A" in k)


def check_buckets(run: OptionRun, default: OptionRun) -> None:
    # The wide images train at the 5:3 buckets nearest 2:1, not cropped to the square.
    assert {tuple(b) for b in run.manifest()["buckets"]} == {(64, 64), (80, 48), (48, 80)}
    assert {tuple(b) for b in default.manifest()["buckets"]} == {(64, 64)}
    assert run.changed_from(default)


def check_bf16(run: OptionRun, default: OptionRun) -> None:
    assert run.manifest()["text_dtype"] == "torch.bfloat16"
    assert default.manifest()["text_dtype"] == "torch.float32"
    assert run.changed_from(default)


def check_gradient_checkpointing(run: OptionRun, default: OptionRun) -> None:
    blocks = "down_blocks.0, down_blocks.1, mid_block, up_blocks.0, up_blocks.1"
    assert f"gradient checkpointing in {blocks}" in run.log
    assert "gradient checkpointing" not in default.log
    # Recomputing activations must not change what is learnt.
    for key, value in default.weights.items():
        torch.testing.assert_close(run.weights[key], value, rtol=0, atol=1e-6, msg=key)


def check_random_crop(run: OptionRun, default: OptionRun) -> None:
    assert run.manifest()["latents"] is False  # crops and flips are drawn every step
    cached = [load_file(p) for p in run.cache.glob("*.safetensors")]
    assert cached and all(set(c) == {"prompt_embeds", "pooled"} for c in cached)
    assert all("latent" in load_file(p) for p in default.cache.glob("*.safetensors"))
    assert run.changed_from(default)


def check_v_prediction(run: OptionRun, default: OptionRun) -> None:
    # The base's fixed-noise loss depends on the target only: v instead of epsilon changes it.
    assert run.result.validation["fixed_noise_loss_base"] != pytest.approx(
        default.result.validation["fixed_noise_loss_base"], rel=1e-3
    )
    assert run.changed_from(default)


def check_schedule_and_accumulation(run: OptionRun, default: OptionRun) -> None:
    lr = 5e-3
    # cosine_with_restarts over 3 steps after 1 warm-up step: full, half, zero after each step.
    assert run.series("lr") == pytest.approx([lr, lr / 2, 0.0], abs=1e-12)
    assert default.series("lr") == pytest.approx([lr, lr, lr])
    # Two micro-batches of 4 images a step.
    assert all(r["images_s"] == pytest.approx(8 * r["it_s"]) for r in run.records if "it_s" in r)
    assert run.changed_from(default)


OPTIONS = {
    "te-lora": ({"text_encoder_lora": True, "cache_text_embeddings": False}, check_te_lora),
    "rank": ({"rank": 2, "alpha": 2.0}, check_rank),
    "buckets": ({"bucketing": True, "bucket_step": 16}, check_buckets),
    "bf16": ({"mixed_precision": "bf16"}, check_bf16),
    "grad-ckpt": ({"gradient_checkpointing": True}, check_gradient_checkpointing),
    "random-crop": ({"crop": "random", "cache_latents": False, "flip": True}, check_random_crop),
    "v-pred": (
        {"prediction_type": "v_prediction", "snr_gamma": 5.0, "noise_offset": 0.05},
        check_v_prediction,
    ),
    "accumulation": (
        {
            "lr_scheduler": "cosine_with_restarts",
            "warmup_steps": 1,
            "gradient_accumulation_steps": 2,
        },
        check_schedule_and_accumulation,
    ),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_training_options_take_effect(option, tiny_base, options_data, default_run, tmp_path):
    """Each option changes what it says it changes (and only gradient checkpointing leaves the
    weights as the default run's), and is recorded in the stored adapter's metadata."""
    changes, check = OPTIONS[option]
    run = option_run(options_config(options_data, tmp_path, name="options", **changes))
    meta = get_adapter(run.result.tag).metadata
    assert meta["training_config"] | changes == meta["training_config"]
    assert (meta["rank"], meta["text_encoder_lora"]) == (
        changes.get("rank", 4),
        changes.get("text_encoder_lora", False),
    )
    assert np.isfinite(run.series()).all()
    check(run, default_run)


def test_text_encoder_lora_is_read_by_plain_diffusers(tiny_base, sample_dir, tmp_path):
    config = config_for(
        sample_dir,
        tmp_path,
        name="te",
        max_steps=20,
        text_encoder_lora=True,
        cache_text_embeddings=False,
        validation_every=0,
    )
    train(config)
    pipe = assert_diffusers_reproduces(tiny_base, get_adapter("te"), config.run_dir(), step=20)
    assert pipe.get_list_adapters().keys() == {"unet", "text_encoder", "text_encoder_2"}


def test_buckets_train_on_mixed_shapes(tiny_base, tmp_path):
    from train.sample_data import write_sample_dataset

    data = write_sample_dataset(tmp_path / "mixed", count=4, size=64)
    for i, size in enumerate([(96, 48), (48, 96)]):
        Image.new("RGB", size, (200, 30, 30)).save(data / f"wide{i}.png")
        (data / f"wide{i}.txt").write_text("a red rectangle")
    config = config_for(
        data,
        tmp_path,
        name="mixed",
        bucketing=True,
        bucket_step=16,
        batch_size=2,
        max_steps=4,
        validation_prompts=(),
    )
    result = train(config)
    assert np.isfinite(result.final_loss)


def test_8bit_adam_without_bitsandbytes_says_how_to_get_it(tiny_base, sample_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here; the message is for machines without it")
    with pytest.raises(
        ValueError, match=r"adamw8bit needs bitsandbytes \(pip install bentolora\[gpu\]\)"
    ):
        train(config_for(sample_dir, tmp_path, name="bnb", optimizer="adamw8bit", max_steps=1))


def test_validation_is_not_dropout_noise_and_training_keeps_dropout(
    tiny_base, sample_dir, tmp_path
):
    """LoRA dropout acts in training only: the fixed-noise validation loss is the same number
    each time it is computed, and the dropout layers are training again afterwards."""
    from train import loop

    config = config_for(
        sample_dir, tmp_path, name="dropout", dropout=0.5, max_steps=1, validation_prompts=()
    )
    run = loop.setup(config)
    with torch.no_grad():  # a LoRA branch that is not zero, so dropout would move the output
        for name, param in run.pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    assert loop.validate(run, step=1) == loop.validate(run, step=1)
    dropouts = [m for m in run.pipe.unet.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and any(m.p == 0.5 and m.training for m in dropouts)

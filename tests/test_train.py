"""Training end to end on the tiny base: it learns, it stores a diffusers-readable adapter, it refuses bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from models.adapter import (
    apply_adapters,
    get_adapter,
    list_adapters,
    load_adapter_weights,
    weights_path,
)
from models.loading import load_pipeline
from models.store import StoreError
from train.config import TrainConfig
from train.dataset import DatasetError
from train.loop import TrainingError, train
from train.metrics import read_metrics
from train.validation import VALIDATION_SEED

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
    with pytest.raises(DatasetError, match="missing"):
        train(config_for(tmp_path / "missing", tmp_path, name="nodata"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        train(config_for(tmp_path / "empty", tmp_path, name="nodata"))
    assert list_adapters() == [e for e in list_adapters() if e.name != "lora-nodata"]


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


@pytest.mark.parametrize(
    "changes",
    [
        {"text_encoder_lora": True, "cache_text_embeddings": False},
        {"bucketing": True, "bucket_step": 16},
        {"mixed_precision": "bf16"},
        {"gradient_checkpointing": True},
        {"crop": "random", "cache_latents": False, "flip": True},
        {"prediction_type": "v_prediction", "snr_gamma": 5.0, "noise_offset": 0.05},
        {
            "lr_scheduler": "cosine_with_restarts",
            "warmup_steps": 1,
            "gradient_accumulation_steps": 2,
        },
    ],
    ids=["te-lora", "buckets", "bf16", "grad-ckpt", "random-crop", "v-pred", "accumulation"],
)
def test_training_options_run_and_store(tiny_base, sample_dir, tmp_path, changes):
    config = config_for(
        sample_dir, tmp_path, name="options", max_steps=3, validation_prompts=(), **changes
    )
    result = train(config)
    entry = get_adapter(result.tag)
    assert entry.metadata["training_config"] | changes == entry.metadata["training_config"]
    state = load_adapter_weights(weights_path(entry))
    components = {k.split(".", 1)[0] for k in state}
    expected = (
        {"unet", "text_encoder", "text_encoder_2"} if changes.get("text_encoder_lora") else {"unet"}
    )
    assert components == expected
    assert np.isfinite(result.final_loss)


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

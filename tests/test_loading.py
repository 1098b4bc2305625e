"""One loader for every source: store tag, diffusers folder, single A1111 file, hub id; VAE override."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.loading import ModelSourceError, load_pipeline, load_vae, resolve_source
from models.single_file import export_single_file
from models.tiny import build_tiny_pipeline

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_pipeline(0)


@pytest.fixture(scope="module")
def tiny_folder(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "sdxl-tiny"
    tiny.save_pretrained(folder)
    return folder


def image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a red circle",
        height=64,
        width=64,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    # Same weights, same seed; tensors loaded from disk may differ in memory layout, which can
    # change float summation order at the 1e-7 level, nothing more.
    assert np.abs(a - b).max() < 1e-5


def assert_same_weights(a, b, components=COMPONENTS):
    for name in components:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def test_folder_round_trip(tiny, tiny_folder):
    loaded = load_pipeline(tiny_folder)
    assert_same_weights(tiny, loaded)
    assert_same_image(image(tiny), image(loaded))


def test_store_tag_loads_the_same_pipeline(tiny, tiny_base):
    loaded = load_pipeline("sdxl-tiny")
    assert_same_weights(tiny, loaded)
    by_version = load_pipeline(f"store:{tiny_base.tag}")
    assert list(by_version.unet.config.block_out_channels) == list(
        tiny.unet.config.block_out_channels
    )


def test_single_file_round_trip(tiny, tiny_folder, tmp_path):
    """An A1111-style single checkpoint, read by diffusers' single-file loader, is the same model."""
    path = export_single_file(tiny, tmp_path / "tiny.safetensors")
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    loaded = load_pipeline(path, single_file_config=str(tiny_folder))
    assert_same_weights(tiny, loaded)
    assert_same_image(image(tiny), image(loaded))


def test_vae_override_from_folder(tiny, tiny_folder, tmp_path):
    other = build_tiny_pipeline(seed=7)
    other.vae.save_pretrained(tmp_path / "vae")
    loaded = load_pipeline(tiny_folder, vae=tmp_path / "vae")
    assert_same_weights(other, loaded, ["vae"])
    assert_same_weights(tiny, loaded, ["unet", "text_encoder", "text_encoder_2"])
    assert not np.array_equal(image(tiny), image(loaded))


def test_vae_override_with_a_pipeline_folder(tiny_folder):
    other = load_vae(tiny_folder)  # a pipeline folder: its vae/ subfolder is used
    assert other.config.latent_channels == 4


def test_dtype_is_the_callers_choice(tiny_folder):
    loaded = load_pipeline(tiny_folder, dtype=torch.bfloat16)
    assert loaded.unet.dtype == torch.bfloat16 and loaded.text_encoder_2.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("sdxl-tiny", "store"),
        ("sdxl-base:abc123", "store"),
        ("stabilityai/stable-diffusion-xl-base-1.0", "hub"),
        ("hf:org/name", "hub"),
        ("store:sdxl-base", "store"),
        ("file:/x/y.safetensors", "single_file"),
    ],
)
def test_sources_are_classified(source, kind):
    assert resolve_source(source).kind == kind


def test_existing_paths_are_classified(tiny_folder, tmp_path):
    assert resolve_source(tiny_folder).kind == "folder"
    file = tmp_path / "m.safetensors"
    file.write_bytes(b"")
    assert resolve_source(file).kind == "single_file"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "empty model source"),
        ("/models/sd_xl_base_1.0.ckpt", "pickled checkpoints are refused"),
        ("/models/missing.safetensors", "no such file"),
        ("./models/missing-folder", "no such folder"),
    ],
)
def test_bad_sources_say_what_is_wrong(source, message):
    with pytest.raises(ModelSourceError, match=message):
        load_pipeline(source)


def test_folder_without_model_index_is_refused(tmp_path):
    (tmp_path / "not-a-pipeline").mkdir()
    with pytest.raises(ModelSourceError, match="no model_index.json"):
        load_pipeline(tmp_path / "not-a-pipeline")

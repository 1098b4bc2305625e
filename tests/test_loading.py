"""One loader for every source: store tag, diffusers folder, single A1111 file, hub id; VAE override.

Everything runs offline (conftest sets HF_HUB_OFFLINE before huggingface_hub is imported): the
single-file paths must work from a local config folder alone, as they must on a machine without
the hub.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from models.loading import ModelSourceError, load_pipeline, load_vae, resolve_source
from models.single_file import export_single_file, export_vae_single_file, pipeline_to_sgm
from models.tiny import build_tiny_pipeline

os.environ["HF_HUB_OFFLINE"] = "1"  # conftest sets it first; this states the intent here too

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="session")
def tiny():
    return build_tiny_pipeline(0)


@pytest.fixture(scope="session")
def tiny_folder(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "sdxl-tiny"
    tiny.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_image(tiny) -> np.ndarray:
    return image(tiny)


@pytest.fixture(scope="session")
def other_vae():
    """A tiny VAE of the same architecture with other weights (seed 7)."""
    return build_tiny_pipeline(seed=7).vae


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


def assert_same_module(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[key], sb[key]) for key in sa)


def test_folder_round_trip(tiny, tiny_folder, tiny_image):
    loaded = load_pipeline(tiny_folder)
    assert_same_weights(tiny, loaded)
    assert_same_image(tiny_image, image(loaded))


def test_store_tag_loads_the_same_pipeline(tiny, tiny_base):
    loaded = load_pipeline("sdxl-tiny")
    assert_same_weights(tiny, loaded)
    by_version = load_pipeline(f"store:{tiny_base.tag}")
    assert list(by_version.unet.config.block_out_channels) == list(
        tiny.unet.config.block_out_channels
    )


def test_single_file_round_trip(tiny, tiny_folder, tiny_image, tmp_path):
    """An A1111-style single checkpoint, read by diffusers' single-file loader, is the same model."""
    path = export_single_file(tiny, tmp_path / "tiny.safetensors")
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    # One layer per block in the tiny UNet: its first up level's upsampler follows an attention.
    assert "model.diffusion_model.output_blocks.1.2.conv.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert not any(k.startswith(("unet.", "vae.", "text_encoder")) for k in keys)
    loaded = load_pipeline(path, single_file_config=str(tiny_folder))
    assert_same_weights(tiny, loaded)
    assert_same_image(tiny_image, image(loaded))


def test_single_file_config_may_be_a_store_tag(tiny, tiny_base, tmp_path):
    path = export_single_file(tiny, tmp_path / "tiny.safetensors")
    loaded = load_pipeline(path, single_file_config="sdxl-tiny")
    assert_same_weights(tiny, loaded, ["unet", "text_encoder_2"])


def test_single_file_without_a_local_config_says_what_to_pass(tiny, tmp_path):
    import huggingface_hub.constants

    cached = os.path.join(
        huggingface_hub.constants.HF_HUB_CACHE, "models--stabilityai--stable-diffusion-xl-base-1.0"
    )
    if os.path.isdir(cached):
        pytest.skip("this machine caches the SDXL configs, so the default config is readable")
    path = export_single_file(tiny, tmp_path / "tiny.safetensors")
    with pytest.raises(ModelSourceError, match="single_file_config"):
        load_pipeline(path)


def test_single_file_config_must_be_a_pipeline_folder(tiny, tmp_path):
    path = export_single_file(tiny, tmp_path / "tiny.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="no model_index.json"):
        load_pipeline(path, single_file_config=str(tmp_path / "empty"))


def test_export_writes_safetensors_only(tiny, tmp_path):
    with pytest.raises(ValueError, match=".safetensors"):
        export_single_file(tiny, tmp_path / "tiny.ckpt")


def test_full_size_sgm_keys_are_what_diffusers_reads_as_sdxl():
    """On the real architecture (meta device, no memory): diffusers detects SDXL base from the
    exported keys, and its own SGM converters map them back onto every parameter, same shapes."""
    from diffusers.loaders import single_file_utils as sfu

    from models.full_size import build_full_size_pipeline

    pipe = build_full_size_pipeline(meta=True)
    sgm = pipeline_to_sgm(pipe)
    assert sfu.infer_diffusers_model_type(sgm) == "xl_base"
    converted = {
        "unet": sfu.convert_ldm_unet_checkpoint(sgm, dict(pipe.unet.config)),
        "vae": sfu.convert_ldm_vae_checkpoint(sgm, dict(pipe.vae.config)),
        "text_encoder": {
            k.removeprefix("text_model."): v
            for k, v in sfu.convert_ldm_clip_checkpoint(sgm).items()
        },
        "text_encoder_2": sfu.convert_open_clip_checkpoint(
            pipe.text_encoder_2, sgm, prefix="conditioner.embedders.1.model."
        ),
    }
    for name, state in converted.items():
        expected = {k: v.shape for k, v in getattr(pipe, name).state_dict().items()}
        assert {k: v.shape for k, v in state.items()} == expected, name


def test_vae_override_from_folder(tiny, tiny_folder, tiny_image, other_vae, tmp_path):
    other_vae.save_pretrained(tmp_path / "vae")
    loaded = load_pipeline(tiny_folder, vae=tmp_path / "vae")
    assert_same_module(other_vae, loaded.vae)
    assert_same_weights(tiny, loaded, ["unet", "text_encoder", "text_encoder_2"])
    assert not np.array_equal(tiny_image, image(loaded))


def test_vae_override_with_a_pipeline_folder(tiny, tiny_folder):
    vae = load_vae(tiny_folder)  # a pipeline folder: its vae/ subfolder is used
    assert_same_module(tiny.vae, vae)


@pytest.mark.parametrize("layout", ["sgm", "diffusers"])
def test_vae_from_a_single_file(layout, tiny_folder, other_vae, tmp_path):
    """A standalone VAE file (as the fp16-fix VAE ships) with the config of the base it joins."""
    if layout == "sgm":
        path = export_vae_single_file(other_vae, tmp_path / "vae.safetensors")
        with safe_open(path, "pt") as f:
            assert "decoder.mid.attn_1.q.weight" in set(f.keys())
    else:
        other_vae.save_pretrained(tmp_path / "vae")
        path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    vae = load_vae(path, config=tiny_folder)
    assert_same_module(other_vae, vae)
    assert vae.config.scaling_factor == 0.13025


def test_vae_single_file_defaults_to_the_sdxl_config(other_vae, tmp_path):
    """Without config= the published SDXL VAE config is assumed (not SD 1.5's from the hub), so a
    VAE of another architecture is refused with a message that names the fix."""
    path = export_vae_single_file(other_vae, tmp_path / "vae.safetensors")
    with pytest.raises(ModelSourceError, match="pass config="):
        load_vae(path)


def test_full_size_vae_single_file_loads_offline_with_sdxl_scaling(tmp_path):
    """The production case: an SDXL VAE file (e.g. the fp16-fix VAE) with no config at hand."""
    from diffusers import AutoencoderKL

    from models.sdxl_config import VAE_CONFIG

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_CONFIG).to(torch.float16)
    path = export_vae_single_file(vae, tmp_path / "sdxl_vae.safetensors")
    loaded = load_vae(path, dtype=torch.float16)
    assert loaded.config.scaling_factor == 0.13025  # SD 1.5's would be 0.18215
    assert_same_module(vae, loaded)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("/models/sdxl_vae.ckpt", "pickled checkpoints are refused"),
        ("/models/missing.safetensors", "no such file"),
    ],
)
def test_bad_vae_sources_say_what_is_wrong(source, message):
    with pytest.raises(ModelSourceError, match=message):
        load_vae(source)


def test_dtype_is_the_callers_choice(tiny_folder):
    loaded = load_pipeline(tiny_folder, dtype=torch.bfloat16)
    assert loaded.unet.dtype == torch.bfloat16 and loaded.text_encoder_2.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("source", "kind", "ref"),
    [
        ("sdxl-tiny", "store", "sdxl-tiny"),
        ("sdxl-base:abc123", "store", "sdxl-base:abc123"),
        ("stabilityai/stable-diffusion-xl-base-1.0", "hub", None),
        ("hf:org/name", "hub", "org/name"),
        ("store:sdxl-base", "store", "sdxl-base"),
        ("store:org/looks-like-hub", "store", "org/looks-like-hub"),
        ("folder:/not/checked/yet", "folder", "/not/checked/yet"),
        ("file:/x/y.safetensors", "single_file", "/x/y.safetensors"),
        ("  sdxl-tiny  ", "store", "sdxl-tiny"),
    ],
)
def test_sources_are_classified(source, kind, ref):
    resolved = resolve_source(source)
    assert resolved.kind == kind
    assert resolved.ref == (ref if ref is not None else source)


def test_existing_paths_are_classified(tiny_folder, tmp_path):
    assert resolve_source(tiny_folder).kind == "folder"
    assert resolve_source(str(tiny_folder)).ref == str(tiny_folder)
    file = tmp_path / "m.safetensors"
    file.write_bytes(b"")
    assert resolve_source(file).kind == "single_file"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "empty model source"),
        ("   ", "empty model source"),
        ("/models/sd_xl_base_1.0.ckpt", "pickled checkpoints are refused"),
        ("/models/model.bin", "pickled checkpoints are refused"),
        ("/models/missing.safetensors", "no such file"),
        ("./models/missing-folder", "no such folder"),
        ("org/name/extra", "no such folder"),
    ],
)
def test_bad_sources_say_what_is_wrong(source, message):
    with pytest.raises(ModelSourceError, match=message):
        load_pipeline(source)


def test_folder_without_model_index_is_refused(tmp_path):
    (tmp_path / "not-a-pipeline").mkdir()
    with pytest.raises(ModelSourceError, match="no model_index.json"):
        load_pipeline(tmp_path / "not-a-pipeline")

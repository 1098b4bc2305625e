"""Write an SDXL pipeline as one `.safetensors` in the original Stability (SGM) key layout.

That is the form A1111, ComfyUI and Civitai use, and the form `load_pipeline` reads through
diffusers' `from_single_file`. Writing it lets users take a base back to those tools, and lets the
tests exercise the single-file loading path on the tiny model, since no real checkpoint can be
downloaded here. The mapping is derived from each network's config, so the same code writes the
tiny model and the full-size SDXL.

Key layout (diffusers -> SGM), per network:
- UNet `model.diffusion_model.`: `conv_in` -> `input_blocks.0.0`; down level i, layer j ->
  `input_blocks.{1 + i(L+1) + j}.{0 resnet | 1 attention}`, its downsampler ->
  `input_blocks.{(i+1)(L+1)}.0.op`; up level i, layer j -> `output_blocks.{i(L+1) + j}`, its
  upsampler after the last layer's attention; mid -> `middle_block.{0,1,2}`. Resnet layers are
  renamed (`norm1` -> `in_layers.0`, ...); transformer blocks keep their diffusers names.
- VAE `first_stage_model.`: `down_blocks.i.resnets.j` -> `down.i.block.j`, decoder levels
  numbered in reverse, the mid attention's linears stored as 1×1 convolutions.
- CLIP-L `conditioner.embedders.0.transformer.`: the transformers keys under `text_model.`.
- OpenCLIP bigG `conditioner.embedders.1.model.`: q/k/v fused into `in_proj_*`, the projection
  stored transposed (OpenCLIP multiplies `x @ text_projection`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

Rule = tuple[str, str, dict[str, str]]
"""(diffusers module prefix, SGM module prefix, renames of the layers inside that module)."""

UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _unet_rules(unet: UNet2DConditionModel) -> list[Rule]:
    """SGM numbers UNet blocks in one flat sequence; work the indices out from the config."""
    per_level = unet.config.layers_per_block + 1  # resnets per level, plus its resampler slot
    rules: list[Rule] = [
        ("time_embedding.linear_1", "time_embed.0", {}),
        ("time_embedding.linear_2", "time_embed.2", {}),
        ("add_embedding.linear_1", "label_emb.0.0", {}),
        ("add_embedding.linear_2", "label_emb.0.2", {}),
        ("conv_in", "input_blocks.0.0", {}),
        ("conv_norm_out", "out.0", {}),
        ("conv_out", "out.2", {}),
        ("mid_block.resnets.0", "middle_block.0", UNET_RESNET),
        ("mid_block.attentions.0", "middle_block.1", {}),
        ("mid_block.resnets.1", "middle_block.2", UNET_RESNET),
    ]
    for i, block in enumerate(unet.down_blocks):
        for j in range(per_level - 1):
            index = 1 + i * per_level + j
            rules.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0", UNET_RESNET))
            rules.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{index}.1", {}))
        if block.downsamplers:
            index = (i + 1) * per_level
            rules.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{index}.0.op", {}))
    for i, block in enumerate(unet.up_blocks):
        for j in range(per_level):
            index = i * per_level + j
            rules.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0", UNET_RESNET))
            rules.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{index}.1", {}))
        if block.upsamplers:
            # The upsampler follows the last layer's attention, or its resnet when it has none.
            slot = 2 if getattr(block, "attentions", None) else 1
            index = i * per_level + per_level - 1
            rules.append((f"up_blocks.{i}.upsamplers.0", f"output_blocks.{index}.{slot}", {}))
    return rules


def _vae_rules(vae: AutoencoderKL) -> list[Rule]:
    """The VAE keeps most names; its levels are `down.i` / `up.i`, and decoder levels reversed."""
    levels = len(vae.config.block_out_channels)
    rules: list[Rule] = [(name, name, {}) for name in ("quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        rules += [
            (f"{part}.conv_in", f"{part}.conv_in", {}),
            (f"{part}.conv_out", f"{part}.conv_out", {}),
            (f"{part}.conv_norm_out", f"{part}.norm_out", {}),
            (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", VAE_RESNET),
            (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", VAE_RESNET),
            (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION),
        ]
    for i in range(levels):
        up = levels - 1 - i
        rules += [
            (f"encoder.down_blocks.{i}.resnets", f"encoder.down.{i}.block", VAE_RESNET),
            (f"encoder.down_blocks.{i}.downsamplers.0", f"encoder.down.{i}.downsample", {}),
            (f"decoder.up_blocks.{i}.resnets", f"decoder.up.{up}.block", VAE_RESNET),
            (f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.up.{up}.upsample", {}),
        ]
    return rules


def _rename(key: str, rules: list[Rule], network: str) -> str:
    for prefix, sgm_prefix, inner in rules:
        if key.startswith(prefix + "."):
            rest = key[len(prefix) + 1 :]
            # VAE resnets are listed per level, so `rest` may begin with the layer index.
            head, dot, tail = rest.partition(".") if rest[:1].isdigit() else ("", "", rest)
            for name, sgm_name in inner.items():
                if tail.startswith(name + "."):
                    tail = sgm_name + tail[len(name) :]
                    break
            return f"{sgm_prefix}.{head}{dot}{tail}"
    raise KeyError(f"{network} key {key!r} has no SGM name; is this an SDXL-style {network}?")


def unet_to_sgm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The UNet's weights under their `model.diffusion_model.` names."""
    rules = _unet_rules(unet)
    return {UNET_PREFIX + _rename(k, rules, "UNet"): v for k, v in unet.state_dict().items()}


def vae_to_sgm(vae: AutoencoderKL, prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    """The VAE's weights under their SGM names; `prefix=""` gives a standalone VAE file."""
    rules = _vae_rules(vae)
    out = {}
    for key, value in vae.state_dict().items():
        new = _rename(key, rules, "VAE")
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # a linear in diffusers, a 1×1 convolution in SGM
        out[prefix + new] = value
    return out


def clip_l_to_sgm(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """CLIP-L keeps the transformers names, under `text_model.` as in the original checkpoint."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        # transformers >= 5.6 dropped the `text_model.` level of CLIPTextModel; SGM keeps it.
        key = key if key.startswith("text_model.") else "text_model." + key
        out[CLIP_L_PREFIX + key] = value
    return out


def open_clip_to_sgm(text_encoder_2: CLIPTextModelWithProjection) -> dict[str, torch.Tensor]:
    """The bigG encoder in OpenCLIP's own layout, which is what SGM checkpoints store."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder_2.state_dict().items()}
    sd.pop("embeddings.position_ids", None)
    out = {
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
        "text_projection": sd.pop("text_projection.weight").T.contiguous(),
    }
    for layer in range(text_encoder_2.config.num_hidden_layers):
        src, dst = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            qkv = [sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
            for name, sgm_name in OPEN_CLIP_LAYER.items():
                out[f"{dst}{sgm_name}.{kind}"] = sd.pop(f"{src}{name}.{kind}")
    if sd:
        raise KeyError(f"text_encoder_2 keys with no OpenCLIP name: {sorted(sd)[:5]}")
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def pipeline_to_sgm(pipe: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    """All four networks' weights under SGM names (no copies: the pipeline's own tensors)."""
    return {
        **unet_to_sgm(pipe.unet),
        **vae_to_sgm(pipe.vae),
        **clip_l_to_sgm(pipe.text_encoder),
        **open_clip_to_sgm(pipe.text_encoder_2),
    }


def _save(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: single-file checkpoints are written as .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    log.info("wrote %d tensors to %s", len(tensors), path)
    return path


def export_single_file(pipe: StableDiffusionXLPipeline, path: str | Path) -> Path:
    """Write `pipe`'s four networks as one SGM-layout `.safetensors` at `path`, in their dtype.

    Tokenizers and scheduler are not stored (A1111 checkpoints carry none); loading it back with
    diffusers takes them from a diffusers folder of the same architecture (`config=`).
    """
    return _save(pipeline_to_sgm(pipe), path)


def export_vae_single_file(vae: AutoencoderKL, path: str | Path) -> Path:
    """Write a standalone VAE as A1111 and the fp16-fix VAE ship it: SGM names, no prefix."""
    return _save(vae_to_sgm(vae, prefix=""), path)

"""Write an SDXL pipeline as one `.safetensors` in the original Stability (SGM) layout.

That is the form A1111, ComfyUI and Civitai use. The project reads it with `load_pipeline`
(diffusers' `from_single_file`); writing it lets users take a base back to those tools, and lets
the tests exercise the single-file loading path on the tiny model, since no real checkpoint can
be downloaded here.

Key layout (diffusers -> SGM), per component:
- UNet `model.diffusion_model.`: `conv_in` -> `input_blocks.0.0`; level i, layer j ->
  `input_blocks.{1 + i(L+1) + j}.{0 resnet | 1 attention}`, its downsampler ->
  `input_blocks.{(i+1)(L+1)}.0.op`; up level i, layer j -> `output_blocks.{i(L+1) + j}`, its
  upsampler after the last layer's attention; mid -> `middle_block.{0,1,2}`.
- VAE `first_stage_model.`: `down_blocks.i.resnets.j` -> `down.i.block.j`, decoder levels
  reversed, attention 1×1 convolutions instead of linears.
- CLIP-L `conditioner.embedders.0.transformer.` + the transformers keys.
- OpenCLIP bigG `conditioner.embedders.1.model.`: q/k/v fused into `in_proj_*`, the projection
  transposed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

RESNET_NAMES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _unet_prefix_map(unet: torch.nn.Module) -> list[tuple[str, str]]:
    """(diffusers module prefix, SGM prefix) pairs for every block of this UNet's config."""
    layers = unet.config.layers_per_block
    pairs: list[tuple[str, str]] = list(UNET_TOP.items())
    for i, block in enumerate(unet.down_blocks):
        for j in range(layers):
            index = 1 + i * (layers + 1) + j
            pairs.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0"))
            if getattr(block, "attentions", None):
                pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{index}.1"))
        if block.downsamplers:
            pairs.append(
                (
                    f"down_blocks.{i}.downsamplers.0.conv",
                    f"input_blocks.{(i + 1) * (layers + 1)}.0.op",
                )
            )
    pairs += [
        ("mid_block.resnets.0", "middle_block.0"),
        ("mid_block.attentions.0", "middle_block.1"),
        ("mid_block.resnets.1", "middle_block.2"),
    ]
    for i, block in enumerate(unet.up_blocks):
        has_attention = bool(getattr(block, "attentions", None))
        for j in range(layers + 1):
            index = i * (layers + 1) + j
            pairs.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0"))
            if has_attention:
                pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{index}.1"))
        if block.upsamplers:
            last = i * (layers + 1) + layers
            pairs.append(
                (
                    f"up_blocks.{i}.upsamplers.0.conv",
                    f"output_blocks.{last}.{2 if has_attention else 1}.conv",
                )
            )
    return pairs


def _rename(key: str, pairs: list[tuple[str, str]], resnet_rule: bool) -> str:
    for new, old in pairs:
        if key.startswith(new + "."):
            rest = key[len(new) + 1 :]
            if resnet_rule and ".resnets." in new or new.startswith("mid_block.resnets"):
                for diffusers_name, sgm_name in RESNET_NAMES:
                    if rest.startswith(diffusers_name + "."):
                        rest = sgm_name + rest[len(diffusers_name) :]
                        break
            return f"{old}.{rest}"
    raise KeyError(f"no SGM name for UNet key {key}")


def unet_to_sgm(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    pairs = _unet_prefix_map(unet)
    return {UNET_PREFIX + _rename(k, pairs, True): v for k, v in unet.state_dict().items()}


def vae_to_sgm(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        for i in range(levels):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(
                f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."
            )
            new = new.replace(
                f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block."
            )
            new = new.replace(
                f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample."
            )
        new = new.replace("mid_block.resnets.0.", "mid.block_1.").replace(
            "mid_block.resnets.1.", "mid.block_2."
        )
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for diffusers_name, sgm_name in (
                ("group_norm", "norm"),
                ("to_q", "q"),
                ("to_k", "k"),
                ("to_v", "v"),
                ("to_out.0", "proj_out"),
            ):
                new = new.replace(f"attn_1.{diffusers_name}.", f"attn_1.{sgm_name}.")
            if value.ndim == 2:  # linear in diffusers, 1×1 convolution in SGM
                value = value[:, :, None, None]
        out[VAE_PREFIX + new] = value
    return out


def clip_l_to_sgm(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in text_encoder.state_dict().items():
        # transformers >= 5.6 dropped the `text_model.` level of CLIPTextModel; SGM keeps it.
        key = key if key.startswith("text_model.") else "text_model." + key
        out[CLIP_L_PREFIX + key] = value
    return out


def open_clip_to_sgm(text_encoder_2: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder_2.state_dict().items()}
    out = {
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
        "text_projection": sd.pop("text_projection.weight").T.contiguous(),
    }
    sd.pop("embeddings.position_ids", None)
    for layer in range(text_encoder_2.config.num_hidden_layers):
        src, dst = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            )
            for diffusers_name, sgm_name in (
                ("self_attn.out_proj", "attn.out_proj"),
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ):
                out[f"{dst}{sgm_name}.{kind}"] = sd.pop(f"{src}{diffusers_name}.{kind}")
    if sd:
        raise KeyError(f"text_encoder_2 keys with no OpenCLIP name: {sorted(sd)[:5]}")
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def export_single_file(pipe: StableDiffusionXLPipeline, path: str | Path) -> Path:
    """Write `pipe`'s four networks as one SGM-layout `.safetensors` at `path`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: single-file checkpoints are written as .safetensors")
    tensors = {
        **unet_to_sgm(pipe.unet),
        **vae_to_sgm(pipe.vae),
        **clip_l_to_sgm(pipe.text_encoder),
        **open_clip_to_sgm(pipe.text_encoder_2),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)
    log.info("wrote %d tensors to %s", len(tensors), path)
    return path

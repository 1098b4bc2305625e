"""LoRA files made elsewhere, read into one form, and the kohya file other tools read, written.

Formats read (`read_layers`) and written (`kohya_state_dict`):
- **kohya** (sd-scripts; what A1111, ComfyUI and most Civitai SDXL files use): per adapted
  module `lora_unet_<m>`, `lora_te1_<m>` or `lora_te2_<m>`, where `<m>` is the module's path
  with `_` for `.`, then `.lora_down.weight` (A: rank × in), `.lora_up.weight` (B: out × rank)
  and `.alpha` (a scalar: the layer adds alpha / rank · B A; absent, alpha = rank). kohya trains
  SDXL on Stability's (SGM) UNet, so its UNet names follow that layout (`input_blocks_4_1_…`,
  `middle_block_1_…`, `output_blocks_0_1_…`, `in_layers_2` for a ResNet's `conv1`, …); names in
  diffusers' layout (`down_blocks_1_attentions_0_…`, as OneTrainer writes) are read too. Written
  files use the SGM layout, as kohya does.
- **diffusers** (`StableDiffusionXLPipeline.save_lora_weights`, the store's own format):
  `unet.<m>.lora_A.weight` / `.lora_B.weight`, `text_encoder.…`, `text_encoder_2.…`, each
  component's peft LoraConfig in the header (`lora_adapter_metadata`; absent: alpha = rank).
- **PEFT** (`PeftModel.save_pretrained` of a UNet): `base_model.model.<m>.lora_A.weight`, the
  LoraConfig in the `adapter_config.json` beside the file (absent: alpha = rank).

Every other kind of weight is refused by name (LyCORIS LoHa, LoKr, …, DoRA): only plain
low-rank factors are served here.

transformers 5 flattened `CLIPTextModel` (the first text encoder has no `text_model.` level any
more; `CLIPTextModelWithProjection` kept it). Files name its layers as before
(`lora_te1_text_model_encoder_…`, `text_encoder.text_model.encoder.…`): both spellings are read,
files are written with `text_model.`, and LoRA configs name text-encoder layers without it (a
peft pattern matches the end of a module's name, so they match in either layout).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from models.adapter import AdapterError

log = logging.getLogger(__name__)

Layer = tuple[str, str]
"""(component, module path in diffusers' naming), e.g. ("unet", "mid_block.attentions.0.proj_in")."""

CLIP_TOP = ("embeddings", "encoder", "final_layer_norm")
"""The parts of a CLIP text model that sit under `text_model.` in the classic layout."""
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
KOHYA_KEY = re.compile(
    r"^(lora_unet|lora_te1|lora_te2)_(\w+)\.(lora_down\.weight|lora_up\.weight|alpha)$"
)
DIFFUSERS_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.(lora_A|lora_B)\.weight$")
PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B)\.weight$")
PEFT_CONFIG = "adapter_config.json"
HEADER_KEY = "lora_adapter_metadata"

NOT_LORA: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("LyCORIS LoHa", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")),
    (
        "LyCORIS LoKr",
        ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    ),
    ("LyCORIS (IA)^3", ("on_input",)),
    ("LyCORIS GLoRA", ("a1.weight", "a2.weight", "b1.weight", "b2.weight")),
    ("LyCORIS OFT/BOFT", ("oft_blocks", "oft_diag", "oft_R", "boft_R", "boft_s")),
    ("LyCORIS full (weight differences)", ("diff", "diff_b")),
    ("LyCORIS norm", ("w_norm", "b_norm")),
    ("LoCon with a Tucker core (lora_mid)", ("lora_mid.weight",)),
    ("DoRA", ("dora_scale", "lora_magnitude_vector")),
    ("LoRA bias", ("lora_A.bias", "lora_B.bias", "lora_up.bias", "lora_down.bias")),
)
"""Weights that are not plain LoRA factors, by the name of what they are and the key parts that
show them."""

RESNET_SGM = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
TOP_SGM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_out": "out.2",
}


class LoraFileError(AdapterError):
    """A LoRA file that cannot be imported or written; the message names the file and the keys."""


@dataclass(frozen=True)
class Pair:
    """One adapted layer: down (A), up (B) and alpha; the layer adds alpha / rank · B A."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    source: str
    """The layer's name in the file it came from (for messages)."""

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class BaseLayers:
    """The three adaptable models of a base (weights may be on the meta device: only names and
    shapes are read here)."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    tag: str = "the base"
    """The base's store tag, for messages."""


def shown(items: list[str], limit: int = 5) -> str:
    """`a, b, c (and 7 more)`: a list for a one-line message."""
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# --- reading


def read_layers(
    path: Path,
    state_dict: Mapping[str, torch.Tensor],
    header: Mapping[str, str],
    base: BaseLayers,
) -> tuple[str, dict[Layer, Pair]]:
    """The file's format (`kohya`, `diffusers`, `peft`) and its layers in diffusers' naming,
    each checked against `base` (the layer exists, the factors fit it)."""
    if not state_dict:
        raise LoraFileError(f"{path.name}: the file holds no tensors")
    refuse_non_lora(path, state_dict)
    fmt = detect_format(path, state_dict)
    if fmt == "kohya":
        layers = _kohya_layers(path, state_dict, base)
    elif fmt == "diffusers":
        configs = _header_configs(path, header)
        layers = _factor_layers(path, state_dict, DIFFUSERS_KEY, configs, base)
    else:
        configs = {"unet": _peft_config(path)}
        layers = _factor_layers(path, state_dict, PEFT_KEY, configs, base)
    check_shapes(path, layers, base)
    return fmt, layers


def refuse_non_lora(path: Path, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise LoraFileError naming every kind of non-LoRA weight the file holds."""
    found: dict[str, str] = {}
    for key in state_dict:
        parts = key.split(".")
        for kind, markers in NOT_LORA:
            if kind not in found and any(_has_parts(parts, m.split(".")) for m in markers):
                found[kind] = key
    if found:
        kinds = ", ".join(f"{kind} (e.g. {key})" for kind, key in found.items())
        raise LoraFileError(
            f"{path.name} holds {kinds}: not LoRA; only plain LoRA factors "
            "(lora_down/lora_up or lora_A/lora_B) can be imported"
        )


def _has_parts(parts: list[str], wanted: list[str]) -> bool:
    n = len(wanted)
    return any(parts[i : i + n] == wanted for i in range(len(parts) - n + 1))


def detect_format(path: Path, state_dict: Mapping[str, torch.Tensor]) -> str:
    """The format every key of the file follows; LoraFileError naming the keys that follow none."""
    patterns = {"kohya": KOHYA_KEY, "diffusers": DIFFUSERS_KEY, "peft": PEFT_KEY}
    counts = {fmt: sum(1 for k in state_dict if p.match(k)) for fmt, p in patterns.items()}
    fmt = max(counts, key=counts.__getitem__)
    unknown = sorted(k for k in state_dict if not patterns[fmt].match(k))
    if not counts[fmt]:
        raise LoraFileError(
            f"{path.name}: no key is a LoRA key of kohya (lora_unet_<module>.lora_down.weight), "
            f"diffusers (unet.<module>.lora_A.weight) or PEFT (base_model.model.<module>.lora_A.weight): "
            f"{shown(unknown)}"
        )
    if unknown:
        raise LoraFileError(
            f"{path.name}: {len(unknown)} keys are not {fmt} LoRA keys as the rest are: {shown(unknown)}"
        )
    return fmt


def _kohya_layers(
    path: Path, state_dict: Mapping[str, torch.Tensor], base: BaseLayers
) -> dict[Layer, Pair]:
    names = kohya_names(base)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = KOHYA_KEY.match(key)
        parts.setdefault(f"{match[1]}_{match[2]}", {})[match[3]] = tensor
    unknown = sorted(name for name in parts if name not in names)
    if unknown:
        raise LoraFileError(
            f"{path.name}: {len(unknown)} of its {len(parts)} layers are not layers of base {base.tag} "
            f"({shown(unknown)}); is it a LoRA for another model? choose its base with --base"
        )
    return {names[name]: _kohya_pair(path, name, p) for name, p in sorted(parts.items())}


def _kohya_pair(path: Path, name: str, parts: dict[str, torch.Tensor]) -> Pair:
    missing = [p for p in ("lora_down.weight", "lora_up.weight") if p not in parts]
    if missing:
        raise LoraFileError(f"{path.name}: {name} has no {' or '.join(missing)}")
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    alpha = float(down.shape[0])
    if "alpha" in parts:
        if parts["alpha"].numel() != 1:
            raise LoraFileError(
                f"{path.name}: {name}.alpha has shape {tuple(parts['alpha'].shape)}, not one number"
            )
        alpha = float(parts["alpha"].item())
        if alpha == 0:
            raise LoraFileError(
                f"{path.name}: {name}.alpha is 0, which kohya reads as alpha = rank and A1111 as "
                "scale 0; set the alpha you mean"
            )
    return Pair(down, up, alpha, name)


def _factor_layers(
    path: Path,
    state_dict: Mapping[str, torch.Tensor],
    pattern: re.Pattern,
    configs: Mapping[str, dict | None],
    base: BaseLayers,
) -> dict[Layer, Pair]:
    """diffusers and PEFT files: lora_A / lora_B per module, alpha from the component's config."""
    parts: dict[Layer, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        groups = pattern.match(key).groups()
        component, module, which = groups if len(groups) == 3 else ("unet", *groups)
        parts.setdefault((component, module), {})[which] = tensor
    layers = {}
    for (component, module), pair in sorted(parts.items()):
        name = f"{component}.{module}"
        if set(pair) != {"lora_A", "lora_B"}:
            raise LoraFileError(f"{path.name}: {name} lacks its lora_A or lora_B weight")
        rank = int(pair["lora_A"].shape[0])
        alpha = config_alpha(path, configs.get(component), module, rank)
        layer = (component, base_name(base, component, module))
        layers[layer] = Pair(pair["lora_A"], pair["lora_B"], alpha, name)
    return layers


def base_name(base: BaseLayers, component: str, module: str) -> str:
    """A text-encoder layer's path in the base's own layout (with or without `text_model.`)."""
    if component == "unet":
        return module
    model = getattr(base, component)
    for candidate in (module, module.removeprefix("text_model."), f"text_model.{module}"):
        try:
            model.get_submodule(candidate)
        except AttributeError:
            continue
        return candidate
    return module


def classic_name(component: str, module: str) -> str:
    """A layer's path as files name it: text-encoder layers under `text_model.`."""
    if component != "unet" and module.split(".", 1)[0] in CLIP_TOP:
        return f"text_model.{module}"
    return module


def portable_name(component: str, module: str) -> str:
    """A layer's name in a LoRA config: the end of its path that is the same in both layouts."""
    return module if component == "unet" else module.removeprefix("text_model.")


def _header_configs(path: Path, header: Mapping[str, str]) -> dict[str, dict]:
    """Per component, the LoraConfig diffusers wrote in the header (keys `unet.r`, …)."""
    raw = header.get(HEADER_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoraFileError(f"{path.name}: its {HEADER_KEY} header is not JSON ({err})") from err
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def _peft_config(path: Path) -> dict | None:
    config_path = path.parent / PEFT_CONFIG
    if not config_path.is_file():
        log.warning("%s: no %s beside it; alpha = rank for every layer", path.name, PEFT_CONFIG)
        return None
    try:
        return json.loads(config_path.read_text("utf8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoraFileError(f"{config_path}: not a JSON LoraConfig ({err})") from err


def config_alpha(path: Path, config: dict | None, module: str, rank: int) -> float:
    """The alpha that gives `module` the scale peft gives it under `config`, as plain LoRA
    (alpha / rank): rank_pattern and alpha_pattern applied, rsLoRA's alpha / sqrt(r) re-expressed."""
    if config is None:
        return float(rank)  # diffusers and peft load a file without a config with alpha = r
    for field, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA bias")):
        if config.get(field):
            raise LoraFileError(f"{path.name}: its config sets {field} ({what}): not plain LoRA")
    r = _by_pattern(config.get("rank_pattern"), module, config.get("r", rank))
    if r != rank:
        raise LoraFileError(f"{path.name}: {module} has rank {rank} but its config says {r}")
    alpha = float(_by_pattern(config.get("alpha_pattern"), module, config.get("lora_alpha", r)))
    return alpha * math.sqrt(r) if config.get("use_rslora") else alpha


def _by_pattern(patterns: dict | None, module: str, default):
    """peft's rule: the first pattern that matches the end of the module's name (at a dot)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def check_shapes(path: Path, layers: Mapping[Layer, Pair], base: BaseLayers) -> None:
    """LoraFileError naming each layer the base lacks or whose factors do not fit it."""
    problems = [p for layer, pair in layers.items() if (p := _shape_problem(layer, pair, base))]
    if problems:
        raise LoraFileError(f"{path.name} does not fit base {base.tag}: {shown(problems)}")


def _shape_problem(layer: Layer, pair: Pair, base: BaseLayers) -> str | None:
    component, module = layer
    try:
        target = getattr(base, component).get_submodule(module)
    except AttributeError:
        return f"{pair.source}: the base has no layer {component}.{module}"
    r = pair.rank
    if isinstance(target, torch.nn.Linear):
        kind = f"Linear {target.in_features}->{target.out_features}"
        down, up = (r, target.in_features), (target.out_features, r)
    elif isinstance(target, torch.nn.Conv2d):
        kind = f"Conv2d {target.in_channels}->{target.out_channels} {tuple(target.kernel_size)}"
        down = (r, target.in_channels, *target.kernel_size)
        up = (target.out_channels, r, 1, 1)
    else:
        return f"{pair.source}: {component}.{module} is a {type(target).__name__}, not Linear or Conv2d"
    if tuple(pair.down.shape) != down or tuple(pair.up.shape) != up:
        return (
            f"{pair.source}: down {tuple(pair.down.shape)} and up {tuple(pair.up.shape)} do not "
            f"fit {kind} (want {down} and {up})"
        )
    return None


# --- kohya names


def kohya_names(base: BaseLayers) -> dict[str, Layer]:
    """Every kohya layer name the base's Linear and Conv2d layers go by (UNet: SGM and diffusers
    layout), with the layer it names."""
    names: dict[str, Layer] = {}
    for component, prefix in KOHYA_PREFIXES.items():
        for module in adaptable_modules(getattr(base, component)):
            names[_kohya(prefix, module)] = (component, module)
            names[_kohya(prefix, classic_name(component, module))] = (component, module)
    for module, sgm in sgm_names(base.unet).items():
        names[_kohya(KOHYA_PREFIXES["unet"], sgm)] = ("unet", module)
    return names


def _kohya(prefix: str, module: str) -> str:
    return f"{prefix}_{module.replace('.', '_')}"


def adaptable_modules(model: torch.nn.Module) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    ]


def sgm_names(unet: torch.nn.Module) -> dict[str, str]:
    """diffusers module path -> the same module's path in Stability's (SGM) UNet, for every
    Linear and Conv2d of `unet` that has one."""
    blocks = {**_down_blocks(unet), **_mid_block(unet), **_up_blocks(unet)}
    names = {}
    for module in adaptable_modules(unet):
        sgm = TOP_SGM.get(module) or _in_block(module, blocks)
        if sgm:
            names[module] = sgm
    return names


def _in_block(module: str, blocks: dict[str, str]) -> str | None:
    parts = module.split(".")
    for n in (5, 4, 3):  # samplers' conv, block resnets/attentions, mid-block parts
        prefix = ".".join(parts[:n])
        if prefix in blocks:
            rest = ".".join(parts[n:])
            if ".resnets." in f".{prefix}.":
                rest = RESNET_SGM.get(rest)
            if rest is None:
                return None
            return f"{blocks[prefix]}.{rest}" if rest else blocks[prefix]
    return None


def _down_blocks(unet) -> dict[str, str]:
    blocks, n = {}, 1  # input_blocks.0 is conv_in
    for i, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            blocks[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{n}.0"
            if getattr(block, "attentions", None) is not None:
                blocks[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
            n += 1
        if block.downsamplers is not None:
            blocks[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
            n += 1
    return blocks


def _mid_block(unet) -> dict[str, str]:
    block = unet.mid_block
    if block is None:
        return {}
    blocks = {f"mid_block.resnets.{k}": f"middle_block.{2 * k}" for k in range(len(block.resnets))}
    for k in range(len(getattr(block, "attentions", None) or [])):
        blocks[f"mid_block.attentions.{k}"] = f"middle_block.{2 * k + 1}"
    return blocks


def _up_blocks(unet) -> dict[str, str]:
    blocks, n = {}, 0
    for i, block in enumerate(unet.up_blocks):
        attention = getattr(block, "attentions", None) is not None
        for j in range(len(block.resnets)):
            blocks[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{n}.0"
            if attention:
                blocks[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n}.1"
            n += 1
        if block.upsamplers is not None:
            blocks[f"up_blocks.{i}.upsamplers.0.conv"] = (
                f"output_blocks.{n - 1}.{2 if attention else 1}.conv"
            )
    return blocks


# --- writing


def kohya_state_dict(layers: Mapping[Layer, Pair], base: BaseLayers) -> dict[str, torch.Tensor]:
    """The kohya file of `layers`: UNet layers in the SGM layout, as sd-scripts writes SDXL
    LoRA; factors as they are, alpha as a float32 scalar."""
    sgm = sgm_names(base.unet)
    out: dict[str, torch.Tensor] = {}
    for (component, module), pair in sorted(layers.items()):
        if component == "unet":
            if module not in sgm:
                raise LoraFileError(f"unet.{module} has no name in kohya's SDXL (SGM) UNet layout")
            module = sgm[module]
        name = _kohya(KOHYA_PREFIXES[component], classic_name(component, module))
        out[f"{name}.lora_down.weight"] = pair.down.contiguous()
        out[f"{name}.lora_up.weight"] = pair.up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(pair.alpha, dtype=torch.float32)
    return out


def peft_layers(
    layers: Mapping[Layer, Pair], *, classic: bool = False
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per component, the peft state dict (`<module>.lora_A.weight`, …; with `classic`, text
    encoder layers under `text_model.` as files name them) and the LoraConfig that gives each
    layer its alpha: the most common rank and alpha, the others as exact-name patterns."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    pairs: dict[str, dict[str, Pair]] = {}
    for (component, module), pair in sorted(layers.items()):
        key = classic_name(component, module) if classic else module
        state.setdefault(component, {})[f"{key}.lora_A.weight"] = pair.down.contiguous()
        state[component][f"{key}.lora_B.weight"] = pair.up.contiguous()
        pairs.setdefault(component, {})[portable_name(component, module)] = pair
    return state, {component: lora_config(p) for component, p in pairs.items()}


def lora_config(pairs: Mapping[str, Pair]) -> dict:
    ranks = {module: pair.rank for module, pair in pairs.items()}
    alphas = {module: pair.alpha for module, pair in pairs.items()}
    r = most_common(ranks.values())
    alpha = most_common(alphas.values())
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(pairs),
        "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(m): v for m, v in alphas.items() if v != alpha},
    }


def most_common(values):
    counts: dict = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return max(counts, key=counts.__getitem__)

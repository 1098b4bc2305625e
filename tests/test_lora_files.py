"""LoRA files from elsewhere (`bentolora-models import-lora`) and to elsewhere (`export-lora`).

The kohya fixture is written here from kohya's documented key naming, not by the exporter: per
module `lora_unet_` / `lora_te1_` / `lora_te2_` + the module's path with `_` for `.`, then
`.lora_down.weight`, `.lora_up.weight` and an `.alpha` scalar (scale alpha / rank). Its peer is
the equivalent diffusers file (`unet.<module>.lora_A.weight`, B pre-scaled by alpha / rank),
rendered by plain diffusers' `load_lora_weights`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file

from models.adapter import (
    apply_adapters,
    get_adapter,
    list_adapters,
    load_adapter_weights,
    weights_path,
)
from models.cli import main
from models.lora_exchange import export_lora, import_lora
from models.lora_files import sgm_names
from models.lora_fusion import FusedLora, read_factors
from models.sdxl_config import UNET_CONFIG
from tests.store_helpers import one_layer_adapter

ROOT = Path(__file__).parent.parent
ATTN = "down_blocks.1.attentions.0.transformer_blocks.0"
TE = "text_model.encoder.layers"
# (component, module, rank, alpha; None: no .alpha key, which kohya reads as alpha = rank)
VARIED = (
    ("unet", f"{ATTN}.attn1.to_q", 4, 2.0),
    ("unet", f"{ATTN}.attn1.to_k", 4, 2.0),
    ("unet", f"{ATTN}.attn1.to_out.0", 4, 8.0),
    ("unet", f"{ATTN}.attn2.to_k", 2, 2.0),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", 4, None),
    ("unet", "up_blocks.0.attentions.1.proj_out", 4, 2.0),
    ("unet", "down_blocks.0.resnets.0.conv1", 2, 1.0),
    ("text_encoder", f"{TE}.0.self_attn.q_proj", 4, 2.0),
    ("text_encoder", f"{TE}.1.mlp.fc1", 4, 2.0),
    ("text_encoder_2", f"{TE}.0.self_attn.v_proj", 4, 4.0),
    ("text_encoder_2", f"{TE}.1.self_attn.out_proj", 2, 2.0),
)
"""Ranks and alphas that differ from layer to layer, a layer without alpha."""
UNIFORM = (
    *[("unet", f"{ATTN}.attn1.{m}", 4, 2.0) for m in ("to_q", "to_k", "to_v", "to_out.0")],
    ("unet", f"{ATTN}.attn2.to_k", 2, 2.0),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", 4, 2.0),
    ("unet", "down_blocks.0.resnets.0.conv1", 2, 2.0),
    *[
        ("text_encoder", f"{TE}.0.self_attn.{m}", 4, 1.0)
        for m in ("q_proj", "k_proj", "v_proj", "out_proj")
    ],
    *[
        ("text_encoder_2", f"{TE}.1.self_attn.{m}", 4, 4.0)
        for m in ("q_proj", "k_proj", "v_proj", "out_proj")
    ],
    ("text_encoder_2", f"{TE}.1.mlp.fc2", 4, 4.0),
)
"""What kohya's trainer writes: one alpha per model, whole attention blocks. diffusers' own kohya
reader (the peer for exported files) reads only such files right: it drops per-layer alphas of
`to_out.0` and of text-encoder layers, and misnames a text encoder's q_proj when its out_proj
has no LoRA."""
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def kohya_name(component: str, module: str) -> str:
    return KOHYA_PREFIX[component] + module.replace(".", "_")


def layer_of(pipe, component: str, module: str) -> torch.nn.Module:
    """Files name text-encoder layers `text_model.…`; transformers 5's CLIPTextModel dropped it."""
    model = getattr(pipe, component)
    if not hasattr(model, "text_model"):
        module = module.removeprefix("text_model.")
    return model.get_submodule(module)


def random_factors(pipe, layers, seed: int = 0) -> dict:
    """(component, module) -> (down, up, alpha or None), big enough to change the image."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for component, module, rank, alpha in layers:
        layer = layer_of(pipe, component, module)
        if isinstance(layer, torch.nn.Conv2d):
            down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=g)
            up = torch.randn(layer.out_channels, rank, 1, 1, generator=g)
            down /= down[0].numel() ** 0.5
        else:
            down = torch.randn(rank, layer.in_features, generator=g) / layer.in_features**0.5
            up = torch.randn(layer.out_features, rank, generator=g)
        factors[(component, module)] = (down, up * 0.15, alpha)
    return factors


def write_kohya(path: Path, factors: dict, name=kohya_name) -> Path:
    tensors = {}
    for (component, module), (down, up, alpha) in factors.items():
        key = name(component, module)
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    return path


def write_diffusers(path: Path, factors: dict) -> Path:
    """The same layers as diffusers writes them, without a LoRA config (so alpha = rank): the
    scale alpha / rank is folded into B."""
    tensors = {}
    for (component, module), (down, up, alpha) in factors.items():
        rank = down.shape[0]
        tensors[f"{component}.{module}.lora_A.weight"] = down
        tensors[f"{component}.{module}.lora_B.weight"] = up * ((alpha or rank) / rank)
    save_file(tensors, path)
    return path


def fresh(base) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(base.path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, seed: int = 7) -> np.ndarray:
    return pipe(
        ["a red circle", "a blue square"],
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=5.0,
        output_type="np",
        generator=[torch.Generator().manual_seed(seed + i) for i in range(2)],
    ).images


def diffusers_render(base, path: Path) -> np.ndarray:
    pipe = fresh(base)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="peer")
    return render(pipe)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module")
def files(tiny_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-files")
    pipe = fresh(tiny_base)
    files = {}
    for kind, layers in (("varied", VARIED), ("uniform", UNIFORM)):
        factors = random_factors(pipe, layers)
        files[kind] = {
            "factors": factors,
            "kohya": write_kohya(folder / f"civitai_{kind}.safetensors", factors),
            "diffusers": write_diffusers(folder / f"diffusers_{kind}.safetensors", factors),
        }
    return files


@pytest.fixture(scope="module")
def imported(tiny_base, files):
    return {
        kind: import_lora(files[kind]["kohya"], f"kohya-{kind}", base="sdxl-tiny")
        for kind in ("varied", "uniform")
    }


@pytest.fixture(scope="module")
def want(tiny_base, files) -> dict[str, np.ndarray]:
    """Plain diffusers rendering the equivalent diffusers files."""
    return {kind: diffusers_render(tiny_base, files[kind]["diffusers"]) for kind in files}


@pytest.mark.parametrize("kind", ["varied", "uniform"])
def test_imported_kohya_file_renders_as_the_equivalent_diffusers_file(
    tiny_base, imported, want, kind
):
    entry = imported[kind]
    pipe = fresh(tiny_base)
    base_image = render(pipe)
    fused = FusedLora(pipe)  # BENTOLORA_LORA_MODE=fused, the default
    fused.activate([(read_factors(weights_path(entry), pipe, tag="k", device="cpu"), 1.0)])
    served_fused = render(pipe)
    pipe = fresh(tiny_base)
    apply_adapters(pipe, [(entry, 1.0)], base=tiny_base)  # BENTOLORA_LORA_MODE=peft
    served_peft = render(pipe)
    assert max_diff(served_fused, want[kind]) <= 2 / 255
    assert max_diff(served_peft, want[kind]) <= 2 / 255
    assert max_diff(want[kind], base_image) > 10 / 255  # the adapter shows
    parts = {key.split(".")[0] for key in load_adapter_weights(weights_path(entry))}
    assert parts == {"unet", "text_encoder", "text_encoder_2"}  # text-encoder parts kept


def test_imported_adapter_records_its_origin_and_base(tiny_base, files, imported):
    meta = imported["varied"].metadata
    digest = hashlib.sha256(files["varied"]["kohya"].read_bytes()).hexdigest()
    assert meta["origin"]["file"] == "civitai_varied.safetensors"
    assert meta["origin"]["format"] == "kohya"
    assert meta["origin"]["sha256"] == digest
    assert meta["origin"]["header"]["ss_network_module"] == "networks.lora"
    assert meta["base_tag"] == tiny_base.tag
    assert meta["base_hash"] == tiny_base.metadata["content_hash"]
    assert meta["text_encoder_lora"] is True
    assert meta["rank"] == 4 and meta["alpha"] == 2.0
    assert imported["varied"].labels["bentolora.base"] == "sdxl-tiny"


def test_diffusers_reads_the_kohya_fixture_as_the_diffusers_file(tiny_base, files, want):
    """The fixture means what kohya's naming says: diffusers' own converter agrees."""
    got = diffusers_render(tiny_base, files["uniform"]["kohya"])
    assert max_diff(got, want["uniform"]) <= 2 / 255


def test_sgm_names_are_read_as_diffusers_names(tiny_base, files, imported, tmp_path):
    """kohya names SDXL's UNet layers as in Stability's UNet. The tiny UNet (layers_per_block=1)
    in that layout: input_blocks 1 and 2 are down_blocks.0's resnet and downsampler, 3 is
    down_blocks.1; output_blocks 0 and 1 are up_blocks.0's layers; middle_block.1 the mid attention."""
    sgm = {
        ATTN: "input_blocks.3.1.transformer_blocks.0",
        "mid_block.attentions.0": "middle_block.1",
        "up_blocks.0.attentions.1": "output_blocks.1.1",
        "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    }

    def sgm_name(component, module):
        for diffusers, stability in sgm.items():
            module = module.replace(diffusers, stability)
        return kohya_name(component, module)

    path = write_kohya(tmp_path / "sgm.safetensors", files["varied"]["factors"], name=sgm_name)
    assert any(".lora_down" in k and "input_blocks_3_1" in k for k in safe_open(path, "pt").keys())
    entry = import_lora(path, "kohya-sgm", base="sdxl-tiny")
    assert_same_factors(entry, imported["varied"])


def test_sgm_names_of_the_full_size_unet():
    """SDXL 1.0's layers under the names its checkpoint (and kohya's files) give them."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIG)
    names = sgm_names(unet)
    expected = {
        "conv_in": "input_blocks.0.0",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        f"{ATTN}.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2": "input_blocks.8.1.transformer_blocks.9.ff.net.2",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
        "up_blocks.0.attentions.2.transformer_blocks.3.attn2.to_k": "output_blocks.2.1.transformer_blocks.3.attn2.to_k",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.attentions.0.proj_out": "output_blocks.3.1.proj_out",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.2.resnets.2.conv2": "output_blocks.8.0.out_layers.3",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_out": "out.2",
    }
    assert {k: names.get(k) for k in expected} == expected
    assert len(names) == sum(
        isinstance(m, torch.nn.Linear | torch.nn.Conv2d) for m in unet.modules()
    )


def assert_same_factors(a, b) -> None:
    """Two stored adapters hold the same tensors and are served with the same scales."""
    wa, wb = load_adapter_weights(weights_path(a)), load_adapter_weights(weights_path(b))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    pipe = StableDiffusionXLPipeline.from_pretrained(get_base_path(a))
    fa = read_factors(weights_path(a), pipe, tag="a", device="cpu").layers
    fb = read_factors(weights_path(b), pipe, tag="b", device="cpu").layers
    assert {k: v[2] for k, v in fa.items()} == pytest.approx({k: v[2] for k, v in fb.items()})


def get_base_path(entry) -> Path:
    from models.bases import base_path

    return base_path(entry.metadata["base_tag"])


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_export_then_import_gives_identical_factors(tiny_base, imported, fmt, tmp_path):
    out = export_lora(imported["varied"].tag, fmt, tmp_path / f"out-{fmt}.safetensors")
    again = import_lora(out, f"again-{fmt}", base="sdxl-tiny")
    assert again.metadata["origin"]["format"] == fmt
    assert_same_factors(imported["varied"], again)


def test_a_trained_adapter_exports_and_imports_identically(tiny_base, tmp_path):
    trained = one_layer_adapter("trained-export", tiny_base, value=0.02)
    out = export_lora(trained.tag, "kohya", tmp_path / "trained.safetensors")
    with safe_open(out, "pt") as f:
        keys = set(f.keys())
    name = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"
    assert keys == {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    assert_same_factors(trained, import_lora(out, "trained-again", base="sdxl-tiny"))


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_exported_files_load_in_diffusers(tiny_base, imported, want, fmt, tmp_path):
    """diffusers converts kohya files on its own (as A1111 and ComfyUI do): a peer reader."""
    out = export_lora(imported["uniform"].tag, fmt, tmp_path / f"for-a1111-{fmt}.safetensors")
    with safe_open(out, "pt") as f:
        keys, header = list(f.keys()), f.metadata()
    if fmt == "kohya":
        assert all(k.split("_")[1] in ("unet", "te1", "te2") for k in keys)
        assert not any("down_blocks" in k or "up_blocks" in k for k in keys)  # SGM, as kohya
        assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in keys)
        assert header["ss_network_module"] == "networks.lora"
        assert header["ss_base_model_version"].startswith("sdxl_")
    else:
        assert any(k.startswith("text_encoder.text_model.encoder.layers.0.") for k in keys)
    assert max_diff(diffusers_render(tiny_base, out), want["uniform"]) <= 2 / 255


def test_peft_and_diffusers_files_keep_their_scales(tiny_base, files, tmp_path):
    """A PEFT file's alpha comes from the adapter_config.json beside it; a diffusers file's from
    its header (rsLoRA re-expressed as plain alpha)."""
    factors = {k: v for k, v in files["varied"]["factors"].items() if k[0] == "unet"}
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(
        {
            f"base_model.model.{module}.lora_{ab}.weight": t
            for (_, module), (down, up, _) in factors.items()
            for ab, t in (("A", down), ("B", up))
        },
        folder / "adapter_model.safetensors",
    )
    rank2 = [m for (_, m), (d, _, _) in factors.items() if d.shape[0] == 2]
    config = {"r": 4, "lora_alpha": 2, "rank_pattern": {m: 2 for m in rank2}, "use_rslora": True}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    entry = import_lora(folder / "adapter_model.safetensors", "from-peft", base="sdxl-tiny")
    assert entry.metadata["origin"]["format"] == "peft"
    pipe = fresh(tiny_base)
    scales = {
        m: s
        for (_, m), (_, _, s) in read_factors(
            weights_path(entry), pipe, tag="p", device="cpu"
        ).layers.items()
    }
    assert scales == pytest.approx(
        {m: 2 / d.shape[0] ** 0.5 for (_, m), (d, _, _) in factors.items()}
    )

    diffusers = export_lora(entry.tag, "diffusers", tmp_path / "d.safetensors")
    assert_same_factors(entry, import_lora(diffusers, "from-diffusers", base="sdxl-tiny"))


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def lycoris_file(path: Path, kind: str) -> Path:
    name = f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_q"
    parts = {
        "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
        "lokr": ("lokr_w1", "lokr_w2_a", "lokr_w2_b"),
        "dora": ("lora_down.weight", "lora_up.weight", "dora_scale"),
    }[kind]
    save_file(
        {f"{name}.{p}": torch.zeros(4, 4) for p in parts} | {f"{name}.alpha": torch.tensor(1.0)},
        path,
    )
    return path


@pytest.mark.parametrize(
    ("kind", "named"), [("loha", "LyCORIS LoHa"), ("lokr", "LyCORIS LoKr"), ("dora", "DoRA")]
)
def test_lycoris_files_are_refused_by_name(tiny_base, capsys, tmp_path, kind, named):
    path = lycoris_file(tmp_path / f"{kind}.safetensors", kind)
    code, out, err = cli(capsys, "import-lora", str(path), "--name", kind, "--base", "sdxl-tiny")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err, err
    assert "not LoRA" in err
    assert not [e for e in list_adapters() if e.name == f"lora-{kind}"]


def bad_file(path: Path, case: str) -> Path:
    down = f"{kohya_name('unet', ATTN + '.attn1.to_q')}.lora_down.weight"
    up = down.replace("lora_down", "lora_up")
    if case == "pickle":
        path = path.with_suffix(".ckpt")
        torch.save({down: torch.zeros(4, 64)}, path)
    elif case == "garbage":
        path.write_bytes(b"this is not a safetensors file")
    elif case == "empty":
        save_file({}, path)
    else:
        tensors = {
            "wrong-dims": {down: torch.zeros(4, 640), up: torch.zeros(640, 4)},
            "rank-mismatch": {down: torch.zeros(4, 64), up: torch.zeros(64, 2)},
            "unknown-keys": {"model.diffusion_model.foo.weight": torch.zeros(2)},
            "mixed-keys": {
                down: torch.zeros(4, 64),
                up: torch.zeros(64, 4),
                "lora_unet_x.weight": torch.zeros(2),
            },
            "sd1-text-encoder": {
                "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 2)
            },
            "not-in-base": {
                "lora_unet_input_blocks_7_1_proj_in.lora_down.weight": torch.zeros(4, 1280)
            },
            "no-up": {down: torch.zeros(4, 64)},
            "alpha-0": {
                down: torch.zeros(4, 64),
                up: torch.zeros(64, 4),
                down.replace("lora_down.weight", "alpha"): torch.tensor(0.0),
            },
            "nan": {down: torch.full((4, 64), float("nan")), up: torch.zeros(64, 4)},
        }[case]
        save_file(tensors, path)
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("pickle", "must be .safetensors"),
        ("garbage", "not a readable safetensors file"),
        ("empty", "holds no tensors"),
        ("wrong-dims", "do not fit Linear 64->64"),
        ("rank-mismatch", "do not fit Linear 64->64"),
        ("unknown-keys", "no key is a LoRA key of kohya"),
        ("mixed-keys", "1 keys are not kohya LoRA keys as the rest are: lora_unet_x.weight"),
        ("sd1-text-encoder", "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"),
        ("not-in-base", "are not layers of base sdxl-tiny:"),
        ("no-up", "has no lora_up.weight"),
        ("alpha-0", "alpha is 0"),
        ("nan", "is not finite"),
    ],
)
def test_bad_files_get_one_line_and_store_nothing(tiny_base, capsys, tmp_path, case, message):
    path = bad_file(tmp_path / "bad.safetensors", case)
    name = f"bad-{case}"
    code, out, err = cli(capsys, "import-lora", str(path), "--name", name, "--base", "sdxl-tiny")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not [e for e in list_adapters() if e.name == f"lora-{name}"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "Bad Name", "--base", "sdxl-tiny"], "is not allowed"),
        (["--name", "ok", "--base", "sdxl-nowhere"], "'sdxl-nowhere' is not in the model store"),
    ],
)
def test_bad_arguments_are_named(tiny_base, files, capsys, args, message):
    code, _, err = cli(capsys, "import-lora", str(files["varied"]["kohya"]), *args)
    assert code == 1 and err.count("\n") == 1 and message in err, err


def test_export_refuses_to_overwrite_or_guess(tiny_base, imported, capsys, tmp_path):
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep me")
    for out, message in [
        (taken, "exists; remove it"),
        (tmp_path / "x.pt", "must end in .safetensors"),
        (tmp_path / "no" / "x.safetensors", "no such folder"),
    ]:
        code, _, err = cli(capsys, "export-lora", imported["varied"].tag, str(out))
        assert code == 1 and err.count("\n") == 1 and message in err, err
    assert taken.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors"]  # no scratch left


def test_the_commands_from_a_shell(tiny_base, files, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "models", *args],
            capture_output=True,
            text=True,
            env=dict(os.environ),
            cwd=ROOT,
            timeout=300,
        )

    imported = run(
        "import-lora", str(files["varied"]["kohya"]), "--name", "from-shell", "--base", "sdxl-tiny"
    )
    assert imported.returncode == 0, imported.stderr
    tag = imported.stdout.split()[1]
    assert tag.startswith("lora-from-shell:") and "kohya file" in imported.stdout
    out = tmp_path / "from-shell.safetensors"
    exported = run("export-lora", tag, str(out), "--format", "kohya")
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout == f"wrote {out} (kohya)\n"
    assert get_adapter(tag).metadata["origin"]["file"] == files["varied"]["kohya"].name

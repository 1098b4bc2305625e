"""LoRA merged into the weights in place (BENTOLORA_LORA_MODE=fused) against diffusers' own
`load_lora_weights` + `set_adapters` on the same files: the peer the fused path must match."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from models.adapter import AdapterError, AdapterInfo, save_adapter, weights_path
from models.lora_fusion import FusedLora, check_mergeable, read_factors, weight_of
from models.pipeline_speed import SpeedOptions, speed_up

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv_in", "proj_in")
TEXT_TARGETS = ("q_proj", "v_proj")
UNET_CONFIG = {
    "r": 4,
    "lora_alpha": 8,
    "rank_pattern": {"conv_in": 2},
    "alpha_pattern": {"to_out.0": 3},
    "target_modules": list(UNET_TARGETS),
}


def random_factors(model, targets, rank_of, seed: int) -> dict[str, torch.Tensor]:
    """Peft-format factors on every Linear/Conv2d named by `targets`, big enough to show."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        r = rank_of(name)
        if isinstance(module, torch.nn.Conv2d):
            a = torch.randn(r, module.in_channels, *module.kernel_size, generator=g)
            b = torch.randn(module.out_channels, r, 1, 1, generator=g)
            a /= a[0].numel() ** 0.5
        else:
            a = torch.randn(r, module.in_features, generator=g) / module.in_features**0.5
            b = torch.randn(module.out_features, r, generator=g)
        layers[f"{name}.lora_A.weight"] = a
        layers[f"{name}.lora_B.weight"] = b * 0.1
    return layers


def make_adapter(name: str, base, pipe, seed: int, *, config: bool = True):
    unet = random_factors(pipe.unet, UNET_TARGETS, lambda n: 2 if n == "conv_in" else 4, seed)
    text = random_factors(pipe.text_encoder, TEXT_TARGETS, lambda n: 4, seed + 100)
    info = AdapterInfo(
        base_tag=base.tag,
        base_hash=base.metadata["content_hash"],
        rank=4,
        alpha=8.0,
        dropout=0.0,
        target_modules=list(UNET_TARGETS),
        text_encoder_lora=True,
    )
    lora_config = (
        {
            "unet": UNET_CONFIG,
            "text_encoder": {"r": 4, "lora_alpha": 2, "target_modules": list(TEXT_TARGETS)},
        }
        if config
        else None
    )
    if not config:  # without a config every layer must share one rank (scaling 1)
        unet = {k: v for k, v in unet.items() if not k.startswith("conv_in.")}
    return save_adapter(name, {"unet": unet, "text_encoder": text}, info, lora_config=lora_config)


@pytest.fixture(scope="module")
def adapters(tiny_base):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_base.path)
    return (
        make_adapter("fuse-a", tiny_base, pipe, 1),
        make_adapter("fuse-b", tiny_base, pipe, 2),
        make_adapter("fuse-plain", tiny_base, pipe, 3, config=False),
    )


def fresh(tiny_base) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_base.path)
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


def diffusers_render(tiny_base, choices) -> np.ndarray:
    pipe = fresh(tiny_base)
    for i, (entry, _) in enumerate(choices):
        pipe.load_lora_weights(
            str(entry.path), weight_name=weights_path(entry).name, adapter_name=f"a{i}"
        )
    if choices:
        pipe.set_adapters([f"a{i}" for i in range(len(choices))], [s for _, s in choices])
    return render(pipe)


def fused_render(pipe, fused: FusedLora, choices) -> np.ndarray:
    fused.activate(
        [(read_factors(weights_path(e), pipe, tag=e.tag, device="cpu"), s) for e, s in choices]
    )
    return render(pipe)


@pytest.mark.parametrize(
    "case", ["one", "mix", "no-config"], ids=["one adapter", "two mixed", "no config in header"]
)
def test_fused_equals_diffusers_lora(tiny_base, adapters, case):
    a, b, plain = adapters
    choices = {"one": [(a, 1.0)], "mix": [(a, 0.7), (b, -0.4)], "no-config": [(plain, 1.3)]}[case]
    pipe = fresh(tiny_base)
    base_image = render(pipe)
    got = fused_render(pipe, FusedLora(pipe), choices)
    want = diffusers_render(tiny_base, choices)
    # Same weights: only float summation order differs (W·x + s·B·A·x against (W + s·B·A)·x).
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(want - base_image).max() > 0.05  # the adapters (text encoder too) show


def test_scales_follow_the_header_config(tiny_base, adapters):
    """alpha/r, rank_pattern and alpha_pattern as peft reads them."""
    a = adapters[0]
    factors = read_factors(weights_path(a), fresh(tiny_base), tag=a.tag, device="cpu")
    scaling = {module: s for (_, module), (_, _, s) in factors.layers.items()}
    assert scaling["conv_in"] == 8 / 2  # rank 2 from rank_pattern, alpha 8
    out = [m for m in scaling if m.endswith("to_out.0")]
    assert out and all(scaling[m] == 3 / 4 for m in out)
    assert all(scaling[m] == 8 / 4 for m in scaling if m.endswith("to_q"))
    text = {m: s for (c, m), (_, _, s) in factors.layers.items() if c == "text_encoder"}
    assert text and set(text.values()) == {2 / 4}


def test_switching_restores_the_base_bit_for_bit(tiny_base, adapters):
    pipe = fresh(tiny_base)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    fused = FusedLora(pipe)
    a, b, _ = (read_factors(weights_path(e), pipe, tag=e.tag, device="cpu") for e in adapters)
    for choice in ([(a, 1.0)], [(b, 0.5)], [(a, 0.3), (b, 2.0)], [(a, 1.0)], []):
        assert fused.activate(choice)
    assert not fused.activate([])  # already the base: nothing written
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(te_before[k], v) for k, v in pipe.text_encoder.state_dict().items())


def test_parameters_keep_their_storage(tiny_base, adapters):
    pipe = fresh(tiny_base)
    pointers = [p.data_ptr() for p in pipe.unet.parameters()]
    fused = FusedLora(pipe)
    fused.activate([(read_factors(weights_path(adapters[0]), pipe, tag="a", device="cpu"), 1.0)])
    assert [p.data_ptr() for p in pipe.unet.parameters()] == pointers


def test_fused_qkv_projections_receive_the_adapter(tiny_base, adapters):
    """After `fuse_qkv_projections` attention reads to_qkv / to_kv: the adapter's to_q/to_k/to_v
    must land in those rows, or it would silently do nothing."""
    a = adapters[0]
    plain = fresh(tiny_base)
    want = fused_render(plain, FusedLora(plain), [(a, 1.0)])
    pipe = fresh(tiny_base)
    speed_up(pipe, SpeedOptions(fuse_qkv=True), "cpu")
    base_image = render(pipe)
    got = fused_render(pipe, FusedLora(pipe), [(a, 1.0)])
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(got - base_image).max() > 0.05
    name, attn1 = next(
        (n, m)
        for n, m in pipe.unet.named_modules()
        if getattr(m, "fused_projections", False) and not m.is_cross_attention
    )
    rows = weight_of(pipe, ("unet", f"{name}.to_k"))
    width = attn1.to_q.weight.shape[0]
    assert rows.data_ptr() == attn1.to_qkv.weight[width : 2 * width].data_ptr()


def test_adapters_that_cannot_be_merged_are_refused(tiny_base, adapters, tmp_path):
    pipe = fresh(tiny_base)
    path = weights_path(adapters[0])
    tensors = load_file(path)
    dora = tmp_path / "dora.safetensors"
    save_file(
        tensors,
        dora,
        metadata={
            "format": "pt",
            "lora_adapter_metadata": '{"unet.r": 4, "unet.lora_alpha": 4, "unet.use_dora": true}',
        },
    )
    with pytest.raises(AdapterError, match="use_dora cannot be merged.*BENTOLORA_LORA_MODE=peft"):
        read_factors(dora, pipe, tag="dora", device="cpu")
    with pytest.raises(AdapterError, match="use_dora cannot be merged"):
        check_mergeable(dora, tag="dora")  # what the server checks before it lists an adapter
    wrong_rank = tmp_path / "rank.safetensors"
    save_file(
        tensors,
        wrong_rank,
        metadata={"format": "pt", "lora_adapter_metadata": '{"unet.r": 8, "unet.lora_alpha": 8}'},
    )
    with pytest.raises(AdapterError, match=r"has rank \d but its config says 8"):
        read_factors(wrong_rank, pipe, tag="rank", device="cpu")
    with pytest.raises(AdapterError, match=r"has rank \d but its config says 8"):
        check_mergeable(wrong_rank, tag="rank")
    check_mergeable(path, tag="good")
    half = tmp_path / "half.safetensors"
    save_file({k: v for k, v in tensors.items() if "lora_B" not in k or "conv_in" not in k}, half)
    with pytest.raises(AdapterError, match="conv_in lacks its lora_A or lora_B"):
        read_factors(half, pipe, tag="half", device="cpu")


def test_grouped_merges_write_each_layer_s_own_sum(tiny_base, adapters, monkeypatch):
    """Layers merged by shape group, in chunks of any size, get W0 + Σ scale·s·B@A each, as a
    merge layer by layer computes it."""
    import models.lora_fusion as lora_fusion

    written = []
    for chunk_bytes in (lora_fusion.MERGE_CHUNK_BYTES, 1):  # one chunk per group; one per layer
        monkeypatch.setattr(lora_fusion, "MERGE_CHUNK_BYTES", chunk_bytes)
        pipe = fresh(tiny_base)
        a, b, _ = (read_factors(weights_path(e), pipe, tag=e.tag, device="cpu") for e in adapters)
        base = {
            layer: weight_of(pipe, layer).clone() for layer in a.layers.keys() | b.layers.keys()
        }
        FusedLora(pipe).activate([(a, 0.7), (b, -0.4)])
        for layer, w0 in base.items():
            want = w0.reshape(w0.shape[0], -1).float()
            for factors, scale in ((a, 0.7), (b, -0.4)):
                if layer in factors.layers:
                    down, up, scaling = factors.layers[layer]
                    want = want + scale * scaling * up.flatten(1) @ down.flatten(1)
            got = weight_of(pipe, layer)
            assert torch.allclose(got.reshape(want.shape).float(), want, atol=1e-5), layer
        written.append({layer: weight_of(pipe, layer).clone() for layer in base})
    assert all(torch.allclose(written[0][k], written[1][k], atol=1e-6) for k in written[0])

"""FP8 UNet linear layers (BENTOLORA_FP8, `models.float8`) on the tiny model.

A CPU runs torchao's `weight` mode (float8 storage); `dynamic` (FP8 matmuls) needs CUDA
capability ≥ 8.9, so here only its refusal is tested, and bench/ measures it on the GPU. Both
modes share the float8 tensors that adapters merge into, which is what these tests check: the
quantized layers, the merged rows against the exact merge, the base restored bit for bit, and
the engine's images (one adapter, a mixed batch, compiled) against the unquantized engine's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from test_engine_speed import engine, pixels
from test_engine_speed import store as store  # noqa: F401  (the fixture, with its adapters)
from test_lora_fusion import adapters as adapters  # noqa: F401  (the fixture)
from test_lora_fusion import fresh, fused_render, render

from models.adapter import weights_path
from models.float8 import dequantize_rows, is_float8, quantize_rows
from models.lora_fusion import FusedLora, read_factors, weight_rows
from models.pipeline_speed import SpeedOptions, speed_up
from service.schemas import GenerateRequest
from service.settings import Settings
from tests.service_helpers import pixels as image_pixels
from tests.store_helpers import attention_adapter


def psnr(got: np.ndarray, want: np.ndarray, peak: float) -> float:
    mse = float(np.mean((got.astype(np.float64) - want.astype(np.float64)) ** 2))
    return 10 * np.log10(peak**2 / mse) if mse else float("inf")


def quantized(tiny_base, **options) -> StableDiffusionXLPipeline:
    pipe = fresh(tiny_base)
    speed_up(pipe, SpeedOptions(fp8="weight", **options), "cpu")
    return pipe


def test_fp8_settings_are_checked():
    with pytest.raises(ValueError, match="BENTOLORA_FP8='fp16' is not one of off, dynamic, weight"):
        Settings.from_env({"BENTOLORA_FP8": "fp16"})
    with pytest.raises(ValueError, match="BENTOLORA_FP8 needs BENTOLORA_LORA_MODE=fused"):
        Settings(lora_mode="peft", fp8="weight")
    with pytest.raises(ValueError, match="BENTOLORA_FP8=dynamic needs BENTOLORA_DTYPE=bfloat16"):
        Settings(fp8="dynamic", dtype="float16")
    assert Settings(fp8="weight").speed_options().describe() == "fp8=weight"


def test_dynamic_fp8_is_refused_where_it_cannot_run(tiny_base):
    pipe = fresh(tiny_base)
    with pytest.raises(ValueError, match="fp8=dynamic needs a CUDA device of compute capability"):
        speed_up(pipe, SpeedOptions(fp8="dynamic"), "cpu")
    assert not any(is_float8(p) for p in pipe.unet.parameters())  # refused before any change
    with pytest.raises(ValueError, match="fp8=dynamic needs a CUDA device"):
        engine(fp8="dynamic")  # the server stops at start, saying why


def test_weight_mode_quantizes_the_unet_linear_layers_only(tiny_base):
    plain = fresh(tiny_base)
    want = render(plain)
    pipe = quantized(tiny_base, fuse_qkv=True)
    linears = [m for m in pipe.unet.modules() if type(m) is torch.nn.Linear]
    assert linears and all(is_float8(m.weight) for m in linears)
    assert all(m.weight.qdata.dtype == torch.float8_e4m3fn for m in linears)
    assert all(m.weight.scale.shape == (m.out_features, 1) for m in linears)  # one per row
    assert not any(is_float8(p) for p in pipe.text_encoder.parameters())
    assert not any(is_float8(p) for p in pipe.vae.parameters())
    assert not is_float8(pipe.unet.conv_in.weight)
    got = render(pipe)
    assert np.abs(got - want).max() > 0  # quantized: not the same image
    assert psnr(got, want, 1.0) > 35, psnr(got, want, 1.0)


def test_adapters_merge_into_float8_rows_and_the_base_comes_back_exactly(tiny_base, adapters):
    pipe = quantized(tiny_base, fuse_qkv=True)
    a, b, _ = (read_factors(weights_path(e), pipe, tag=e.tag, device="cpu") for e in adapters)
    layers = sorted((a.layers.keys() | b.layers.keys()) - {("unet", "conv_in")})
    layers = [layer for layer in layers if layer[0] == "unet"]
    assert layers

    def rows(layer):
        weight, where = weight_rows(pipe, layer)
        return weight.qdata[where].clone(), weight.scale[where].clone()

    base = {layer: rows(layer) for layer in layers}
    fused = FusedLora(pipe)
    fused.activate([(a, 0.7), (b, -0.4)])
    for layer in layers:
        want = dequantize_rows(*base[layer])
        for factors, scale in ((a, 0.7), (b, -0.4)):
            if layer in factors.layers:
                down, up, scaling = factors.layers[layer]
                want = want + scale * scaling * up @ down
        want_q, want_scale = quantize_rows(want, torch.float32)
        got_q, got_scale = rows(layer)
        # One rounding to float8 of W0 + ΔW (the merge sums in another order: a row's last bit
        # may differ, never more).
        assert torch.allclose(got_scale, want_scale, rtol=1e-5), layer
        got, exact = dequantize_rows(got_q, got_scale), dequantize_rows(want_q, want_scale)
        assert torch.allclose(got, exact, rtol=2**-3, atol=float(want_scale.max()) * 2**-9), layer
        assert not torch.equal(got, dequantize_rows(*base[layer])), layer  # the adapter shows
    fused.activate([])
    for layer in layers:
        got_q, got_scale = rows(layer)
        assert torch.equal(got_q.view(torch.uint8), base[layer][0].view(torch.uint8)), layer
        assert torch.equal(got_scale, base[layer][1]), layer


def test_an_adapter_on_float8_weights_gives_the_unquantized_adapter_s_image(tiny_base, adapters):
    a = adapters[0]
    plain = fresh(tiny_base)
    want = fused_render(plain, FusedLora(plain), [(a, 1.0)])
    pipe = quantized(tiny_base, fuse_qkv=True)
    base_image = render(pipe)
    got = fused_render(pipe, FusedLora(pipe), [(a, 1.0)])
    assert psnr(got, want, 1.0) > 35, psnr(got, want, 1.0)
    assert np.abs(got - base_image).max() > 0.05  # the adapter shows


@pytest.fixture(scope="module")
def mixable(tiny_base, store):  # noqa: F811  (store: the CLIP the engine needs)
    """Two adapters on attention only (LoRA on a convolution cannot share a pass)."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_base.path)
    return [
        attention_adapter(f"fp8-{name}", tiny_base, pipe, seed, rank=rank)
        for name, seed, rank in (("a", 31, 4), ("b", 32, 2))
    ]


def test_the_engine_serves_fp8_with_merged_and_per_image_adapters(mixable):
    names = (None, "fp8-a", "fp8-b")
    plain = engine()
    want = {name: pixels(plain, name) for name in names}
    fp8 = engine(fp8="weight", fuse_qkv=True, mixed_max_rank=8)
    assert fp8.state.ready and is_float8(fp8.pipe.unet.time_embedding.linear_1.weight)
    alone = {name: pixels(fp8, name) for name in names}  # one adapter set a call: merged
    for name in names:
        assert psnr(alone[name], want[name], 255) > 30, (name, psnr(alone[name], want[name], 255))
    for name in names[1:]:
        assert np.abs(want[name] - want[None]).max() > 20, name  # the adapter shows

    mixed = [
        GenerateRequest(
            prompt=f"a red circle {i}",
            width=64,
            height=64,
            steps=3,
            seed=100 + i,
            output_format="png",
            adapters=[{"name": name, "scale": 0.8}] if name else [],
        )
        for i, name in enumerate(names)
    ]
    one_by_one = [fp8.generate([request])[0].images[0] for request in mixed]  # merged
    together = fp8.generate(mixed)
    for i, response in enumerate(together):
        [image] = response.images
        assert image.timings["batch_images"] == 3  # one pass, per-image low-rank terms
        assert image.timings["batch_adapter_sets"] == 3
        got, merged = image_pixels(image.image), image_pixels(one_by_one[i].image)
        # The per-image term adds B·A·x beside the float8 base, the merge rounds W0 + B·A to
        # float8: the two differ by that rounding, far less than the adapter moves the image.
        assert psnr(got, merged, 255) > 30, names[i]


@pytest.mark.slow
def test_compiled_float8_unet_switches_adapters_without_recompiling(store):  # noqa: F811
    eager = engine(fp8="weight")
    want = {name: pixels(eager, name) for name in (None, "speed-a", "speed-b")}
    fast = engine(fp8="weight", compile="blocks", warmup=True)
    assert is_float8(fast.pipe.unet.time_embedding.linear_1.weight)
    pixels(fast, None)  # batch size 2: compiled once here (warm-up ran 1 and 8)
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = {name: pixels(fast, name) for name in ("speed-a", "speed-b", None)}
    assert counters["stats"]["unique_graphs"] == graphs
    for name, image in want.items():
        assert np.abs(got[name] - image).max() <= 2, name

"""Many adapters in one batch (issue 16): per-image LoRA in one pipeline call, the tiered adapter
cache, and loading an adapter beside the running batches.

The peer for every mixed image is the same request served alone, where its adapters are merged
into the weights (the fused path, itself checked against diffusers in test_lora_fusion.py)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from store_helpers import attention_adapter, one_layer_adapter

from models.lora_batched import PerImageLora
from service import batcher
from service.adapter_cache import AdapterCache
from service.engine import Engine
from service.schemas import GenerateRequest
from service.settings import Settings
from tests.service_helpers import response_pixels


@pytest.fixture(scope="module")
def adapters(tiny_base):
    from models.clip import build_tiny_clip, save_clip

    save_clip(*build_tiny_clip(0), "clip-tiny", source="tiny:seed=0", reuse_identical=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_base.path)
    return {
        "a": attention_adapter("mix-a", tiny_base, pipe, 21, rank=4),
        "b": attention_adapter("mix-b", tiny_base, pipe, 22, rank=2),
        "te": attention_adapter("mix-te", tiny_base, pipe, 23, unet_targets=(), text=True),
        "conv": attention_adapter(
            "mix-conv", tiny_base, pipe, 24, unet_targets=("conv_in", "to_q")
        ),
    }


def engine(**options) -> Engine:
    settings = Settings(
        base="sdxl-tiny", clip="clip-tiny", device="cpu", ui=False, max_batch_images=8, **options
    )
    return Engine(settings)


def request(i: int, adapters: list[tuple[str, float]]) -> GenerateRequest:
    return GenerateRequest(
        prompt=f"a red circle {i}",
        width=64,
        height=64,
        steps=3,
        seed=300 + i,
        adapters=[{"name": n, "scale": s} for n, s in adapters],
    )


SETS = [
    [("mix-a", 0.8), ("mix-b", 0.6)],  # two adapters mixed
    [("mix-te", 1.0), ("mix-a", 0.0)],  # text encoders only, and a scale of 0
    [("mix-b", -0.7)],  # a negative scale
    [],  # no adapter
]


def test_a_mixed_batch_runs_in_one_call_and_each_image_equals_its_own(adapters):
    served = engine()
    requests = [request(i, SETS[i % 4]) for i in range(8)]
    alone = [response_pixels(served.generate([r])[0])[0] for r in requests]
    together = served.generate(requests)
    for i, response in enumerate(together):
        [image] = response.images
        assert image.timings["batch_images"] == 8  # one pipeline call for all eight
        assert image.timings["batch_adapter_sets"] == 4
        assert np.abs(response_pixels(response)[0] - alone[i]).max() <= 2, SETS[i % 4]
        assert [(a.name, a.scale) for a in image.adapters] == [
            (n.removeprefix("lora-"), s) for n, s in SETS[i % 4]
        ]
    # Each set changes the image (so a set applied to the wrong image would show), text-encoder
    # LoRA included: set 1 differs from the base only through its text encoders.
    base = [alone[i] for i in range(8) if i % 4 == 3]
    for k in range(3):
        assert np.abs(alone[k] - base[0]).max() > 10, SETS[k]


def test_fused_qkv_projections_hold_each_part_s_rank(adapters):
    """After BENTOLORA_FUSE_QKV one term computes q, k and v: a set at the rank limit on each of
    them (mix-a + mix-b: 6 on to_q, to_k and to_v) still shares the pass."""
    served = engine(fuse_qkv=True, mixed_max_rank=6)
    requests = [request(i, SETS[i % 4]) for i in range(4)]
    alone = [response_pixels(served.generate([r])[0])[0] for r in requests]
    together = served.generate(requests)
    for i, response in enumerate(together):
        assert response.images[0].timings["batch_images"] == 4, SETS[i]
        assert np.abs(response_pixels(response)[0] - alone[i]).max() <= 2, SETS[i]


def test_sets_that_cannot_share_a_pass_run_alone_with_the_same_images(adapters):
    served = engine(mixed_max_rank=4)  # mix-a + mix-b add up to rank 6 on a layer: over it
    requests = [
        request(0, [("mix-conv", 1.0)]),  # LoRA on a convolution
        request(1, SETS[0]),
        request(2, SETS[2]),
        request(3, []),
    ]
    alone = [response_pixels(served.generate([r])[0])[0] for r in requests]
    together = served.generate(requests)
    calls = [r.images[0].timings["batch_images"] for r in together]
    assert calls == [1, 1, 2, 2]  # conv and the over-rank mix alone; the other two share
    for i, response in enumerate(together):
        assert np.abs(response_pixels(response)[0] - alone[i]).max() <= 2, i


def test_peft_mode_runs_one_call_per_set(adapters):
    served = engine(lora_mode="peft")
    together = served.generate([request(0, SETS[2]), request(1, [])])
    assert [r.images[0].timings["batch_images"] for r in together] == [1, 1]


def test_per_image_terms_check_what_they_can_hold(tiny_base, adapters):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_base.path)
    with pytest.raises(ValueError, match="slots"):
        PerImageLora(pipe, slots=1, max_rank=8)
    terms = PerImageLora(pipe, slots=3, max_rank=8)
    cache = AdapterCache(pipe, tiny_base, mixed=terms)
    assert "convolution" in cache.mixable(((adapters["conv"], 1.0),))
    assert cache.mixable(((adapters["a"], 1.0), (adapters["b"], 1.0))) is None
    with pytest.raises(ValueError, match="at most 2"):
        terms.fill([((f, 1.0),) for f in [cache._factors(adapters["a"])] * 3], [0, 1, 2])


@pytest.mark.slow
def test_compiled_mixed_batches_never_recompile(adapters):
    from torch._dynamo.utils import counters

    fast = engine(compile="blocks", warmup=True, max_request_images=8)
    assert fast.state.ready  # warm-up compiled batch 1, batch 8 and batch 8 with the terms on
    mixes = [
        [request(i, SETS[i % 4]) for i in range(8)],
        [request(i, SETS[(i + 1) % 2]) for i in range(8)],
        [request(i, SETS[0] if i == 0 else []) for i in range(8)],
        [request(i, [("mix-b", 0.1 * i)]) for i in range(8)],
        [request(0, SETS[2])] * 8,
    ]
    fast.generate(mixes[0])  # the first adapters' load outside the check
    before = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in mixes:
            fast.generate(batch)
    assert counters["stats"]["unique_graphs"] == before


@pytest.fixture
def many_adapters(tiny_base):
    """200 adapters, deleted afterwards: the session's store is shared, and every server
    started later would otherwise verify and list them all (the UI's adapter list too)."""
    import bentoml

    entries = [one_layer_adapter(f"tier-{i}", tiny_base, 0.01 + i * 1e-4) for i in range(200)]
    yield entries
    for entry in entries:
        bentoml.models.delete(entry.tag)


def test_tiers_stay_within_their_bounds_over_200_adapters(tiny_base, many_adapters):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_base.path)
    entries = many_adapters
    probe = AdapterCache(pipe, tiny_base)
    probe.prefetch(((entries[0], 1.0),))
    one = probe.device_bytes()
    changes = []
    cache = AdapterCache(
        pipe, tiny_base, device_bytes=16 * one, host_bytes=32 * one, on_change=changes.append
    )
    for entry in entries[:16]:
        cache.activate(((entry, 1.0),))
    after_16 = cache.device_bytes()
    assert after_16 == 16 * one
    for entry in entries[16:]:
        cache.activate(((entry, 1.0),))
        tiers = cache.tiers()
        assert list(tiers.values()).count("device") <= 16
        assert len(tiers) <= 32
    assert abs(cache.device_bytes() - after_16) <= one  # within 50 MB: within one adapter
    tiers = cache.tiers()
    assert tiers[entries[-1].tag] == "device"  # most recent on the device
    assert tiers.get(entries[-20].tag) == "host"  # left the device, still in memory
    assert entries[0].tag not in tiers  # back in the store only
    assert changes[-1] == tiers  # each change was published
    cache.activate(((entries[0], 1.0),))  # read again from the store
    assert cache.tiers()[entries[0].tag] == "device"


def test_a_loading_adapter_holds_back_only_its_own_requests(adapters, monkeypatch):
    served = engine()
    assert not served.adapters.resident(((adapters["b"], 1.0),))
    batches = batcher.for_engine(served, served.settings)
    monkeypatch.setenv("BENTOLORA_FAILPOINTS", "adapter.load=hang")

    async def scenario():
        waiting = asyncio.ensure_future(batches.generate.submit([request(0, [("mix-b", 1.0)])]))
        await asyncio.sleep(0.5)
        [plain] = await asyncio.wait_for(batches.generate.submit([request(1, [])]), 120)
        assert not waiting.done()  # still loading its adapter while the other batch ran
        monkeypatch.delenv("BENTOLORA_FAILPOINTS")
        [loaded] = await asyncio.wait_for(waiting, 120)
        return plain, loaded

    plain, loaded = asyncio.run(scenario())
    assert plain.images[0].adapters == []
    assert loaded.images[0].adapters[0].name == "mix-b"
    assert served.adapters.tiers()[adapters["b"].tag] == "device"

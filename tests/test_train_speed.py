"""Training speed options: selective gradient checkpointing, torch.compile, FLOP counting and
TFLOP/s / MFU in the metrics. Each test fails without the feature it names."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.flops import count_flops, unet_forward_flops, unet_inputs, unet_training_flops
from train.checkpoint import checkpoints_dir
from train.config import RUNTIME_ONLY, ConfigError, TrainConfig
from train.loop import enable_checkpointing, select_blocks, train
from train.lora import add_lora
from train.metrics import read_metrics

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv_in", "proj_in", "proj_out")


def tiny_unet_with_lora():
    from models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(0)
    torch.manual_seed(0)
    add_lora(pipe, TrainConfig(data_dir="d", name="n", rank=4, alpha=4.0, target_modules=TARGETS))
    # B starts at zero; random B makes every LoRA gradient non-zero, so comparisons mean something.
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return pipe.unet


def loss_and_grads(unet) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    inputs = unet_inputs(unet, batch=2, height=8, width=8)
    loss = unet(**inputs, return_dict=False)[0].square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    unet.zero_grad(set_to_none=True)
    return loss.item(), grads


def config_for(sample_dir, tmp_path, **changes) -> TrainConfig:
    values = dict(
        base="sdxl-tiny",
        data_dir=str(sample_dir),
        name="speed",
        output_dir=str(tmp_path / "runs"),
        cache_dir=str(tmp_path / "cache"),
        resolution=64,
        rank=4,
        alpha=4.0,
        learning_rate=1e-3,
        target_modules=TARGETS,
        batch_size=2,
        max_steps=3,
        validation_loss_examples=1,
        tensorboard=False,
        store=False,
    )
    values.update(changes)
    return TrainConfig(**values)


# --- configuration


def test_bad_speed_options_are_reported_together():
    with pytest.raises(ConfigError) as err:
        TrainConfig(
            data_dir="d",
            name="n",
            compile="fast",
            gradient_checkpointing=True,
            checkpoint_blocks=("up_blocks.0", "left_blocks", "mid_block.1"),
            peak_tflops=-1.0,
        )
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "compile: 'fast' is not one of 'off', 'blocks', 'unet'" in message
    assert "checkpoint_blocks: 'left_blocks', 'mid_block.1' not understood" in message
    assert "peak_tflops: -1.0" in message

    with pytest.raises(ConfigError, match="checkpoint_blocks: needs gradient_checkpointing: true"):
        TrainConfig(data_dir="d", name="n", checkpoint_blocks=("up_blocks",))
    with pytest.raises(ConfigError, match="checkpoint_blocks: at least one block"):
        TrainConfig(data_dir="d", name="n", gradient_checkpointing=True, checkpoint_blocks=())


def test_defaults_keep_the_old_behaviour():
    config = TrainConfig(data_dir="d", name="n")
    assert (config.compile, config.checkpoint_blocks, config.peak_tflops) == ("off", ("all",), 0.0)
    # Speed options are runtime options: a run may resume with other ones.
    faster = dataclasses.replace(config, compile="blocks", peak_tflops=989.0)
    assert faster.fingerprint(exclude=RUNTIME_ONLY) == config.fingerprint(exclude=RUNTIME_ONLY)


def test_speed_options_from_the_command_line():
    from pathlib import Path

    from train.cli import config_from_args

    recipe = Path(__file__).parent.parent / "configs" / "quickstart.yaml"
    config = config_from_args(
        ["--config", str(recipe), "--gradient-checkpointing", "--checkpoint-blocks"]
        + ["up_blocks.0,mid_block", "--compile", "blocks", "--peak-tflops", "989"]
    )
    assert config.checkpoint_blocks == ("up_blocks.0", "mid_block")
    assert (config.compile, config.peak_tflops) == ("blocks", 989.0)


# --- selective gradient checkpointing


def test_block_names_resolve_against_the_unet():
    unet = tiny_unet_with_lora()  # down_blocks.0-1, mid_block, up_blocks.0-1
    assert select_blocks(unet, ("all",)) == [
        "down_blocks.0",
        "down_blocks.1",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
    ]
    assert select_blocks(unet, ("up_blocks", "down_blocks.1")) == [
        "down_blocks.1",
        "up_blocks.0",
        "up_blocks.1",
    ]
    with pytest.raises(ValueError, match=r"no block 'up_blocks.7'.*it has down_blocks.0, "):
        select_blocks(unet, ("up_blocks.7",))


def test_checkpointing_is_set_on_exactly_the_chosen_blocks_and_recomputes_only_them():
    unet = tiny_unet_with_lora()
    chosen = enable_checkpointing(unet, ("mid_block", "up_blocks.0"))
    assert chosen == ["mid_block", "up_blocks.0"]
    flagged = checkpointed_modules(unet)
    # The blocks themselves and the transformer models inside them; nothing elsewhere.
    assert "mid_block" in flagged and "up_blocks.0" in flagged
    assert "up_blocks.0.attentions.0" in flagged
    chosen_prefix = ("mid_block.", "up_blocks.0.")
    assert all(n in chosen or n.startswith(chosen_prefix) for n in flagged)
    everything = tiny_unet_with_lora()
    enable_checkpointing(everything, ("all",))
    expected = [n for n in checkpointed_modules(everything) if n.startswith(chosen_prefix)]
    assert sorted(flagged) == sorted(chosen + expected)

    # Checkpointed layers run forward twice (again in the backward pass), the others once:
    # exactly those that checkpointing everything recomputes, inside the chosen blocks.
    recomputed = recomputed_layers(unet)
    assert recomputed
    assert recomputed == {n for n in recomputed_layers(everything) if n.startswith(chosen_prefix)}


def checkpointed_modules(unet: torch.nn.Module) -> list[str]:
    """Names of the modules whose gradient_checkpointing flag is on."""
    return [n for n, m in unet.named_modules() if getattr(m, "gradient_checkpointing", False)]


def recomputed_layers(unet) -> set[str]:
    """The ResNet and transformer layers that start a second forward pass during the backward.

    (Pre-hooks: non-reentrant checkpointing stops recomputing once it has the tensors it needs,
    so a layer's forward may not finish the second time.)
    """
    calls: dict[str, int] = {}
    handles = []
    for name, module in unet.named_modules():
        if type(module).__name__ in ("ResnetBlock2D", "BasicTransformerBlock"):

            def count(*_, name=name):
                calls[name] = calls.get(name, 0) + 1

            handles.append(module.register_forward_pre_hook(count))
    loss_and_grads(unet)
    for handle in handles:
        handle.remove()
    assert set(calls.values()) <= {1, 2}
    return {n for n, c in calls.items() if c == 2}


def test_checkpointing_gives_the_same_loss_and_gradients():
    plain = tiny_unet_with_lora()
    loss, grads = loss_and_grads(plain)
    assert all(g.abs().sum() > 0 for g in grads.values())
    for blocks in (("up_blocks",), ("down_blocks.1", "mid_block"), ("all",)):
        unet = tiny_unet_with_lora()
        enable_checkpointing(unet, blocks)
        loss_ckpt, grads_ckpt = loss_and_grads(unet)
        assert loss_ckpt == loss, blocks
        for name, grad in grads.items():
            torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=1e-7, msg=name)


# --- FLOPs


def test_training_flops_count_what_autograd_runs():
    """The meta-device count equals the count of a real forward and backward pass (attention as
    matrix products, which the CPU has no FLOP formula for in its flash kernel)."""
    unet = tiny_unet_with_lora()
    counted = unet_training_flops(unet, batch=2, height=8, width=8)
    inputs = unet_inputs(unet, batch=2, height=8, width=8)
    with sdpa_kernel(SDPBackend.MATH):
        outputs = []
        forward = count_flops(lambda: outputs.append(unet(**inputs, return_dict=False)[0]))
        backward = count_flops(lambda: outputs[0].square().mean().backward())
    assert (counted["forward"], counted["backward"]) == (forward, backward)
    assert counted["step"] == forward + backward
    # Frozen weights get no weight gradients: the backward pass costs about one forward.
    assert 0.7 * forward < backward < 1.5 * forward
    assert unet_forward_flops(unet, batch=2, height=8, width=8) == forward


def test_metrics_carry_tflops_and_mfu(tiny_base, sample_dir, tmp_path):
    config = config_for(sample_dir, tmp_path, name="tflops", peak_tflops=0.001)
    result = train(config)
    records = read_metrics(result.run_dir)
    flops = [r["flops_per_step"] for r in records if "flops_per_step" in r]
    assert len(flops) == 1 and flops[0] > 0
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["tflops"] > 0
        assert r["tflops"] == pytest.approx(flops[0] * r["it_s"] / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.001)

    # Without a peak, no MFU.
    plain = train(dataclasses.replace(config, name="tflops-nopeak", peak_tflops=0.0, max_steps=1))
    record = [r for r in read_metrics(plain.run_dir) if "loss" in r][0]
    assert record["tflops"] > 0 and "mfu" not in record


# --- torch.compile


def adapter_keys(path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return sorted(f.keys())


def adapter_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture
def one_compile_thread():
    """Inductor compiles in this process: on a 2-core CI machine its pool of compile workers
    takes the cores from the run it compiles for (the blocks test: about 200 s instead of 90 s
    with an empty kernel cache; 12 s either way with a warm one)."""
    import torch._inductor.config

    with torch._inductor.config.patch(compile_threads=1):
        yield


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tiny_base, sample_dir, tmp_path, one_compile_thread):
    """compile: blocks with checkpointed up blocks vs plain eager, same seed: the same losses to
    1e-4 relative (compiled kernels round differently), the same adapter keys, weights within 1e-4
    (3 steps at lr 1e-3 move them by up to 3e-3; Adam's normalised update magnifies rounding in
    the smallest gradient components), and checkpoints a run resumes from without compiling."""
    eager = train(config_for(sample_dir, tmp_path, name="eager", checkpoint_every=2))
    compiled = train(
        config_for(
            sample_dir,
            tmp_path,
            name="compiled",
            checkpoint_every=2,
            compile="blocks",
            gradient_checkpointing=True,
            checkpoint_blocks=("up_blocks",),
        )
    )
    losses = {
        run: [r["loss"] for r in read_metrics(result.run_dir) if "loss" in r]
        for run, result in (("eager", eager), ("compiled", compiled))
    }
    assert len(losses["eager"]) == 3
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)

    final = {
        r: r_.run_dir / "final" / "pytorch_lora_weights.safetensors"
        for r, r_ in (("eager", eager), ("compiled", compiled))
    }
    assert adapter_keys(final["compiled"]) == adapter_keys(final["eager"])
    assert not any("_orig_mod" in k for k in adapter_keys(final["compiled"]))
    weights = {run: adapter_tensors(path) for run, path in final.items()}
    for key, value in weights["eager"].items():
        torch.testing.assert_close(weights["compiled"][key], value, rtol=0, atol=1e-4)

    ckpt = {
        run: checkpoints_dir(result.run_dir) / "step-00000002" / "lora.safetensors"
        for run, result in (("eager", eager), ("compiled", compiled))
    }
    assert adapter_keys(ckpt["compiled"]) == adapter_keys(ckpt["eager"])

    # The compiled run resumes eager, with all blocks checkpointed: both are runtime options.
    resumed = train(
        config_for(
            sample_dir,
            tmp_path,
            name="compiled",
            checkpoint_every=2,
            gradient_checkpointing=True,
            resume="latest",
        )
    )
    assert [r["step"] for r in read_metrics(resumed.run_dir) if "loss" in r] == [1, 2, 3]
    resumed_weights = adapter_tensors(final["compiled"])
    for key, value in weights["compiled"].items():
        torch.testing.assert_close(resumed_weights[key], value, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_whole_unet_compiles_with_checkpointing(
    tiny_base, sample_dir, tmp_path, one_compile_thread
):
    """compile: unet, checkpointing the mid block: the same losses as eager to 1e-4 relative and
    the same adapter keys (about 130 s with an empty kernel cache on 2 cores, 11 s with a warm one)."""
    runs = {
        name: train(config_for(sample_dir, tmp_path, name=name, max_steps=2, **options))
        for name, options in (
            ("eager", {}),
            (
                "compiled",
                {
                    "compile": "unet",
                    "gradient_checkpointing": True,
                    "checkpoint_blocks": ("mid_block",),
                },
            ),
        )
    }
    losses = {
        n: [r["loss"] for r in read_metrics(r.run_dir) if "loss" in r] for n, r in runs.items()
    }
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    keys = {
        n: adapter_keys(r.run_dir / "final" / "pytorch_lora_weights.safetensors")
        for n, r in runs.items()
    }
    assert keys["compiled"] == keys["eager"]

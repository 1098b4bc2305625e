"""Training speed: a minimal peft LoRA loop on cached random inputs vs the project's `train`."""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from bench.fixtures import TARGETS
from bench.measure import Row, peak_memory, reset_peak, sync
from models.device import resolve_dtype
from models.store import StoreEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainWork:
    size: int
    batch: int
    steps: int
    """Measured steps, after `warmup` steps."""
    rank: int = 16
    warmup: int = 2


def _inputs(unet: UNet2DConditionModel, work: TrainWork, device: str, dtype: torch.dtype):
    """Cached latents and text embeddings: random, of the shapes the real cache holds."""
    config = unet.config
    latent = work.size // 8
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    size = float(work.size)
    return {
        "latents": torch.randn(work.batch, config.in_channels, latent, latent, device=device),
        "text": torch.randn(work.batch, 77, config.cross_attention_dim, device=device, dtype=dtype),
        "pooled": torch.randn(work.batch, pooled, device=device, dtype=dtype),
        "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * work.batch, device=device),
    }


def plain_loop(base: StoreEntry, work: TrainWork, device: str) -> Row:
    """What a hand-written LoRA trainer does: bf16 UNet (fp32 on a CPU), fp32 LoRA, AdamW,
    autocast, epsilon loss at random timesteps. No checkpointing, no compile."""
    cuda = device.startswith("cuda")
    dtype = resolve_dtype("auto", device)
    reset_peak(device)
    started = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(base.path / "unet", dtype=dtype).to(device)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=work.rank, lora_alpha=work.rank, target_modules=list(TARGETS)))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = _inputs(unet, work, device, dtype)
    autocast = torch.autocast("cuda", dtype) if cuda else contextlib.nullcontext()
    setup = time.perf_counter() - started

    def step() -> None:
        noise = torch.randn_like(batch["latents"])
        t = torch.randint(0, 1000, (work.batch,), device=device)
        with autocast:
            noisy = batch["latents"] + noise * (t.float() / 1000).view(-1, 1, 1, 1)
            pred = unet(
                noisy.to(dtype),
                t,
                encoder_hidden_states=batch["text"],
                added_cond_kwargs={"text_embeds": batch["pooled"], "time_ids": batch["time_ids"]},
            ).sample
            loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(work.warmup):
        step()
    sync(device)
    warmup = time.perf_counter() - t0
    latencies = []
    for _ in range(work.steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        latencies.append(time.perf_counter() - t0)
    memory, kind = peak_memory(device)
    return Row(
        "train",
        f"plain peft loop, r{work.rank}, batch {work.batch}",
        images=work.batch * work.steps,
        seconds=sum(latencies),
        latencies=latencies,
        warmup_s=warmup,
        peak_memory_gb=memory,
        memory_kind=kind,
        extra={"setup_s": setup},
    )


def project_train(
    base: StoreEntry,
    work: TrainWork,
    device: str,
    tmp: Path,
    *,
    compile: str = "off",
    checkpoint_blocks: tuple[str, ...] = (),
) -> Row:
    """`train.loop.train` on the generated sample dataset, the same batch, size and rank.

    `compile` and `checkpoint_blocks` (empty: no gradient checkpointing) are the trainer's
    options of those names. Step times are the trainer's own (`images_s` in metrics.jsonl), past
    the warm-up steps (where compiling happens); FLOPs per image are the trainer's count of a LoRA
    step (`flops_per_step`), its TFLOP/s the median of the measured steps.
    """
    from train.config import TrainConfig
    from train.loop import train
    from train.metrics import read_metrics
    from train.sample_data import write_sample_dataset

    cuda = device.startswith("cuda")
    data = write_sample_dataset(tmp / "data", count=2 * work.batch, size=work.size)
    options = []
    if compile != "off":
        options.append(f"compile {compile}")
    if checkpoint_blocks:
        options.append(f"checkpointing {','.join(checkpoint_blocks)}")
    config = TrainConfig(
        base=base.tag,
        data_dir=str(data),
        name="-".join(["bench", *(o.replace(" ", "-").replace(",", "-") for o in options)]),
        output_dir=str(tmp / "runs"),
        cache_dir=str(tmp / "cache"),
        resolution=work.size,
        rank=work.rank,
        alpha=float(work.rank),
        target_modules=TARGETS,
        batch_size=work.batch,
        max_steps=work.warmup + work.steps,
        mixed_precision="bf16" if cuda else "no",
        compile=compile,
        gradient_checkpointing=bool(checkpoint_blocks),
        checkpoint_blocks=checkpoint_blocks or ("all",),
        validation_loss_examples=1,
        tensorboard=False,
        store=False,
    )
    reset_peak(device)
    started = time.perf_counter()
    result = train(config)
    wall = time.perf_counter() - started
    logged = read_metrics(result.run_dir)
    records = [r for r in logged if "images_s" in r]
    measured = [r for r in records if r["step"] > work.warmup]
    latencies = [work.batch / r["images_s"] for r in measured]
    memory, kind = peak_memory(device)
    trainer_peak = max((r["peak_memory_gb"] for r in records), default=float("nan"))
    flops = next(r["flops_per_step"] for r in logged if "flops_per_step" in r)
    tflops = [r["tflops"] for r in measured]
    return Row(
        "train",
        " + ".join(["project train", *options]) + f", r{work.rank}, batch {work.batch}",
        images=work.batch * len(measured),
        seconds=sum(latencies),
        latencies=latencies,
        warmup_s=sum(work.batch / r["images_s"] for r in records if r["step"] <= work.warmup),
        peak_memory_gb=memory,
        memory_kind=kind,
        flops_per_image=flops / work.batch,
        extra={
            "wall_s_with_setup": wall,
            "trainer_peak_memory_gb": trainer_peak,
            "median_step_s": statistics.median(latencies) if latencies else float("nan"),
            "trainer_tflops": statistics.median(tflops) if tflops else float("nan"),
        },
    )


def project_rows(base: StoreEntry, work: TrainWork, device: str, tmp: Path) -> list[Row]:
    """The project's trainer as is, then (on CUDA only: compiling takes minutes on a CPU) with
    `compile: blocks`, its ratio taken against the first."""
    rows = [project_train(base, work, device, tmp / "eager")]
    if device.startswith("cuda"):
        compiled = project_train(base, work, device, tmp / "compiled", compile="blocks")
        compiled.baseline = rows[0].name
        rows.append(compiled)
    return rows

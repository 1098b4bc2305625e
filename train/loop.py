"""The training loop: from a config to an adapter in the model store. Reads top to bottom."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler
from PIL import Image
from tqdm.auto import tqdm

from models.adapter import (
    AdapterError,
    AdapterInfo,
    check_finite,
    save_adapter,
    write_lora_file,
)
from models.bases import get_base
from models.clip import ClipScorer
from models.flops import unet_training_flops
from models.loading import load_pipeline
from models.store import StoreError
from train.cache import ExampleCache, cache_key
from train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from train.config import RUNTIME_ONLY, TrainConfig
from train.dataset import scan_dataset
from train.features import Features
from train.lora import add_lora, diffusers_layers, load_trainable_state, trainable_state
from train.metrics import MetricsLog
from train.optim import make_lr_schedule, make_optimizer
from train.preprocess import Bucket, choose_bucket, make_buckets
from train.report import write_report
from train.schedule import BatchSchedule
from train.speed import compile_unet, eager, enable_checkpointing
from train.step import denoising_loss
from train.validation import fixed_noise_loss, render_images

log = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a checkpoint from another config, …)."""


@dataclass
class TrainResult:
    tag: str | None
    """Store tag of the saved adapter (None when `store` is off or on non-main processes)."""
    steps: int
    final_loss: float
    validation: dict
    wall_time_s: float
    run_dir: Path


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts: the same parts always give the same seed."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def check_weights_finite(tensors: dict[str, torch.Tensor], step: int) -> None:
    """Raise TrainingError naming the step and the first LoRA tensor holding NaN or inf.

    A loss can stay finite for a step after the update that broke the weights; checking before
    a checkpoint keeps a broken state from becoming the one `--resume latest` picks.
    """
    try:
        check_finite(tensors)
    except AdapterError as err:
        raise TrainingError(
            f"step {step}: {err}. Stopping; lower learning_rate or use bf16 instead of fp16"
        ) from err


def write_final_weights(run_dir: Path, layers: dict, lora_config: dict) -> Path:
    """Write the adapter file into `<run_dir>/final` (diffusers' format, as in the store).

    Written before storing, so the trained weights survive a store that cannot take them (a full
    disk), and a run with `store` off still leaves its result: `load_lora_weights` reads the
    folder as is.
    """
    return write_lora_file(run_dir / "final", layers, lora_config)


def train(config: TrainConfig) -> TrainResult:  # noqa: C901 - one loop, read top to bottom
    started = time.time()
    # A second run in the same process (a notebook, the tests) may ask for another precision;
    # accelerate keeps it in a process-wide singleton, so clear that first (the process group,
    # in PartialState, is kept).
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:
        # Each process would train alone on all the data and store its own adapter.
        raise TrainingError(
            f"launched as {launched} processes but they did not form a group (world size {world}); "
            "on machines without GPUs set ACCELERATE_USE_CPU=1"
        )
    weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
    run_dir = config.run_dir()
    torch.manual_seed(derive_seed(config.seed, "init"))  # LoRA initialisation

    # --- base and data
    base = get_base(config.base)
    scan = scan_dataset(
        config.data_dir, caption_column=config.caption_column, image_column=config.image_column
    )
    examples = scan.examples
    buckets = (
        make_buckets(config.resolution, step=config.bucket_step)
        if config.bucketing
        else [Bucket(config.resolution, config.resolution)]
    )
    bucket_of = []
    for example in examples:
        with Image.open(example.path) as image:
            bucket_of.append(choose_bucket(image.width, image.height, buckets))
    log.info(
        "%d examples (%d skipped) in %d buckets",
        len(examples),
        len(scan.skipped),
        len(set(bucket_of)),
    )

    pipe = load_pipeline(f"store:{base.tag}", dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    prediction_type = config.prediction_type or pipe.scheduler.config.prediction_type
    noise_scheduler = DDPMScheduler.from_config(
        pipe.scheduler.config, prediction_type=prediction_type
    )

    # --- encode once: latents and caption embeddings to the disk cache
    cache = None
    if config.cache_latents or config.cache_text_embeddings:
        settings = {
            "base_hash": base.metadata["content_hash"],
            "data": scan.fingerprint(),
            "buckets": [(b.width, b.height) for b in bucket_of],
            "crop": config.crop,
            "flip": config.flip,
            "latents": config.cache_latents,
            "text": config.cache_text_embeddings,
            "text_dtype": str(weight_dtype),
        }
        cache = ExampleCache(config.cache_dir, cache_key(**settings), settings)
    features = Features(pipe, examples, bucket_of, config, cache)
    needs_vae = not config.cache_latents
    needs_text = not config.cache_text_embeddings
    pipe.text_encoder.to(device, weight_dtype)
    pipe.text_encoder_2.to(device, weight_dtype)
    pipe.vae.to(device)  # float32: SDXL's VAE overflows in half precision
    with accelerator.main_process_first():
        features.fill_cache(device, show_progress=accelerator.is_local_main_process)
    # What the cache made unnecessary leaves the accelerator.
    offload = [
        m
        for m, needed in (
            (pipe.vae, needs_vae),
            (pipe.text_encoder, needs_text),
            (pipe.text_encoder_2, needs_text),
        )
        if not needed
    ]
    for module in offload:
        module.to("cpu")

    # --- LoRA, optimizer, schedule
    pipe.unet.to(device, weight_dtype)
    lora_config = add_lora(pipe, config)
    if config.gradient_checkpointing:
        blocks = enable_checkpointing(pipe.unet, config.checkpoint_blocks)
        log.info("gradient checkpointing in %s", ", ".join(blocks))
    if config.attention == "xformers":
        pipe.unet.enable_xformers_memory_efficient_attention()
    compile_unet(pipe.unet, config.compile)  # last: it traces the LoRA layers and flags above
    modules = {name: getattr(pipe, name) for name in lora_config}
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    total_steps = config.total_steps(len(examples), world)
    optimizer = make_optimizer(config, params, device)
    lr_schedule = make_lr_schedule(config, optimizer, total_steps)
    # Only the UNet is wrapped for data parallelism; text-encoder LoRA gradients (if any) are
    # averaged by hand below, because the pipeline calls the encoders directly.
    unet, optimizer = accelerator.prepare(pipe.unet, optimizer)
    encoder_params = [
        p
        for name, m in modules.items()
        if name != "unet"
        for p in m.parameters()
        if p.requires_grad
    ]
    schedule = BatchSchedule(bucket_of, config.batch_size, config.seed)

    # Validation: the first examples with noise fixed once, scored at fixed timesteps.
    val_indices = list(range(min(config.validation_loss_examples, len(examples))))
    val_batches = [
        features.batch(
            [i], torch.Generator().manual_seed(derive_seed(config.seed, "val", i)), random.Random(i)
        )
        for i in val_indices
    ]

    def validation_loss() -> float:
        with eager():
            return fixed_noise_loss(
                pipe,
                pipe.unet,
                noise_scheduler,
                val_batches,
                prediction_type=prediction_type,
                device=device,
                dtype=weight_dtype,
            )

    scorer = (
        ClipScorer.from_store(config.validation_clip, device=device)
        if config.validation_clip and accelerator.is_main_process
        else None
    )

    def render(step: int) -> None:
        if not config.validation_prompts or not accelerator.is_main_process:
            return
        for module in offload:
            module.to(device)
        with eager():
            paths = render_images(
                pipe,
                config.validation_prompts,
                run_dir / "validation" / f"step-{step:08d}",
                size=config.resolution,
                steps=config.validation_inference_steps,
                guidance=config.validation_guidance,
                device=device,
            )
        for module in offload:
            module.to("cpu")
        if scorer is not None and metrics is not None:
            images = [Image.open(p) for p in paths]
            scores = scorer.clip_scores(images, config.validation_prompts).diagonal()
            metrics.write({"step": step, "clip_score": float(scores.mean())})

    base_val_loss = validation_loss()

    # --- resume
    start_step = 0
    if config.resume:
        checkpoint = load_checkpoint(resolve_resume(run_dir, config.resume))
        want = config.fingerprint(exclude=RUNTIME_ONLY)
        if checkpoint.state.get("config_fingerprint") != want:
            raise TrainingError(
                f"{checkpoint.path} was written by a run with other settings; "
                "resume with the same config (only output, logging and store options may change)"
            )
        load_trainable_state(modules, checkpoint.trainable)
        optimizer.load_state_dict(checkpoint.optimizer)
        lr_schedule.load_state_dict(checkpoint.lr_scheduler)
        start_step = checkpoint.step
        log.info("resumed from %s at step %d", checkpoint.path, start_step)

    metrics = (
        MetricsLog(run_dir, config.tensorboard, resume_step=start_step if config.resume else None)
        if accelerator.is_main_process
        else None
    )
    accum = config.gradient_accumulation_steps
    images_per_step = config.batch_size * accum * world
    progress = tqdm(
        total=total_steps,
        initial=start_step,
        desc="training",
        disable=not accelerator.is_local_main_process,
    )
    if start_step == 0:
        render(0)  # the base's images, for the report to compare against
        if metrics is not None:
            metrics.write({"step": 0, "validation_loss": base_val_loss})  # the base's, too
    # FLOPs of one optimizer step on this process, for TFLOP/s and MFU: counted once, at the
    # first batch's shape (buckets differ in shape but hold about the same number of pixels).
    first = schedule.batch(start_step * accum * world + rank)[1]
    bucket = bucket_of[first[0]]
    flops = unet_training_flops(
        pipe.unet,
        batch=len(first),
        height=bucket.height // pipe.vae_scale_factor,
        width=bucket.width // pipe.vae_scale_factor,
        text_tokens=pipe.tokenizer.model_max_length,
    )
    step_flops = flops["step"] * accum
    log.info(
        "%.3g TFLOP per optimizer step (UNet forward %.3g + backward %.3g per micro-batch)",
        step_flops / 1e12,
        flops["forward"] / 1e12,
        flops["backward"] / 1e12,
    )
    if metrics is not None and start_step == 0:  # a resumed log keeps the first run's
        metrics.write({"step": 0, "flops_per_step": step_flops})
    loss_value = float("nan")
    tick = time.time()

    # --- the loop
    for step in range(start_step, total_steps):
        micro_losses = []
        for micro in range(accum):
            index = (step * accum + micro) * world + rank
            epoch, indices = schedule.batch(index)
            generator = torch.Generator().manual_seed(derive_seed(config.seed, "noise", index))
            torch.manual_seed(derive_seed(config.seed, "dropout", index))
            batch = features.batch(
                indices, generator, random.Random(derive_seed(config.seed, "aug", index))
            )
            with contextlib.ExitStack() as stack:
                if micro < accum - 1:  # sum gradients locally; synchronise once per step
                    stack.enter_context(accelerator.no_sync(unet))
                stack.enter_context(accelerator.autocast())
                loss = denoising_loss(
                    pipe,
                    unet,
                    noise_scheduler,
                    batch,
                    generator=generator,
                    prediction_type=prediction_type,
                    snr_gamma=config.snr_gamma,
                    noise_offset=config.noise_offset,
                    device=device,
                    dtype=weight_dtype,
                )
                accelerator.backward(loss / accum)
            micro_losses.append(loss.detach())
        if world > 1:
            for param in encoder_params:
                param.grad = accelerator.reduce(param.grad, reduction="mean")
        loss_value = accelerator.gather(torch.stack(micro_losses).mean()[None]).mean().item()
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"loss is {loss_value} at step {step + 1} (epoch {epoch}); stopping. Lower "
                "learning_rate, use bf16 instead of fp16, or check the data; nothing was stored"
            )
        grad_norm = (
            float(accelerator.clip_grad_norm_(params, config.max_grad_norm))
            if config.max_grad_norm
            else float("nan")
        )
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        it_s = 1.0 / max(time.time() - tick, 1e-9)
        tflops = step_flops * it_s / 1e12
        speed = {"tflops": tflops}
        if config.peak_tflops:
            speed["mfu"] = tflops / config.peak_tflops
        lr = lr_schedule.get_last_lr()[0]
        progress.update(1)
        progress.set_postfix(
            loss=f"{loss_value:.4f}",
            lr=f"{lr:.2e}",
            it_s=f"{it_s:.2f}",
            tflops=f"{tflops:.3g}",
            **({"mfu": f"{speed['mfu']:.1%}"} if "mfu" in speed else {}),
        )
        if metrics is not None and (done % config.log_every == 0 or done == total_steps):
            metrics.write(
                {
                    "step": done,
                    "epoch": epoch,
                    "loss": loss_value,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "it_s": it_s,
                    "images_s": it_s * images_per_step,
                    **speed,
                    "peak_memory_gb": peak_memory_gb(device),
                }
            )
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < total_steps:
            trainable = trainable_state(modules)
            check_weights_finite(trainable, done)
            if accelerator.is_main_process:
                save_checkpoint(
                    run_dir,
                    done,
                    trainable,
                    optimizer.state_dict(),
                    lr_schedule.state_dict(),
                    {
                        "config_fingerprint": config.fingerprint(exclude=RUNTIME_ONLY),
                        "loss": loss_value,
                    },
                    config.keep_checkpoints,
                )
            accelerator.wait_for_everyone()
        if config.validation_every and done % config.validation_every == 0 and done < total_steps:
            val = validation_loss()
            if metrics is not None:
                metrics.write({"step": done, "validation_loss": val})
            render(done)
        tick = time.time()  # a step's time is its own: not the checkpoint or validation after it
    progress.close()

    # --- the end: validate, then store the adapter
    final_val_loss = validation_loss()
    render(total_steps)
    validation = {"fixed_noise_loss": final_val_loss, "fixed_noise_loss_base": base_val_loss}
    wall = time.time() - started
    if metrics is not None:
        metrics.write({"step": total_steps, "validation_loss": final_val_loss, "wall_time_s": wall})
        metrics.close()
    layers = diffusers_layers(modules)
    for component, tensors in layers.items():
        check_weights_finite({f"{component}.{k}": v for k, v in tensors.items()}, total_steps)
    lora_dicts = {k: v.to_dict() for k, v in lora_config.items()}
    tag = None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        kept = write_final_weights(run_dir, layers, lora_dicts)
    if config.store and accelerator.is_main_process:
        info = AdapterInfo(
            base_tag=base.tag,
            base_hash=base.metadata["content_hash"],
            rank=config.rank,
            alpha=config.alpha,
            dropout=config.dropout,
            target_modules=list(config.target_modules),
            text_encoder_lora=config.text_encoder_lora,
            training_config=config.to_dict(),
            dataset=scan.summary(),
            steps=total_steps,
            final_loss=loss_value,
            validation=validation,
            wall_time_s=round(wall, 2),
            processes=world,
        )
        try:
            tag = save_adapter(config.name, layers, info, lora_config=lora_dicts).tag
        except StoreError as err:
            raise TrainingError(f"{err}. The trained weights are kept in {kept}") from err
    if accelerator.is_main_process:
        write_report(
            run_dir,
            config=config.to_dict(),
            dataset=scan.summary(),
            summary={
                "adapter": tag or "(not stored)",
                "steps": total_steps,
                "final_loss": loss_value,
                **validation,
                "wall_time_s": round(wall, 2),
                "weights": str(kept),
            },
            prompts=config.validation_prompts,
        )
    accelerator.wait_for_everyone()
    return TrainResult(tag, total_steps, loss_value, validation, wall, run_dir)

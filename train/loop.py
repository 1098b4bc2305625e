"""The training loop: from a config to an adapter in the model store. Reads top to bottom.

`train` is the whole run: `setup` builds everything the loop needs (accelerator, data and its
cached encodings, the base with LoRA layers, optimizer, schedule, the checkpoint to resume from,
the metrics log), `validate` scores the base, `fit` runs the optimizer steps (checkpointing and
validating on the way), `validate` scores the result and `store` puts the adapter into the model
store and writes the report. Below them: the UNet's speed options (selective gradient
checkpointing, eager validation) and the two validation measures (a fixed-noise loss, images
from fixed seeds).
"""

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
import torch.utils.checkpoint
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig
from PIL import Image
from tqdm.auto import tqdm

from models.adapter import AdapterError, AdapterInfo, check_finite, save_adapter, write_lora_file
from models.bases import get_base
from models.clip import ClipScorer
from models.flops import unet_training_flops
from models.loading import load_pipeline
from models.pipeline_speed import compile_unet
from models.store import StoreEntry, StoreError
from train.batches import Batch, Batches, BatchSchedule, open_cache
from train.checkpoint import Checkpoint, load_checkpoint, resolve_resume, save_checkpoint
from train.config import RUNTIME_ONLY, VALIDATION_SEED, TrainConfig
from train.data import DatasetScan, example_buckets, training_data
from train.lora import (
    SampleSeeds,
    add_lora,
    diffusers_layers,
    load_trainable_state,
    seed_dropout,
    trainable_state,
)
from train.loss import denoising_loss
from train.metrics import MetricsLog
from train.optim import make_lr_schedule, make_optimizer
from train.report import write_report

log = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FIXED_TIMESTEPS = (100, 300, 500, 700, 900)
"""The fixed-noise loss averages these timesteps, so a change in it is the model's, not chance's."""


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


@dataclass
class Run:
    """One run's objects, built by `setup`, used by `fit`, `validate` and `store`."""

    config: TrainConfig
    accelerator: Accelerator
    dtype: torch.dtype
    """Of the frozen weights (mixed_precision); LoRA weights and the optimizer stay float32."""
    base: StoreEntry
    scan: DatasetScan
    """The examples trained on."""
    held_out: DatasetScan | None
    """The examples kept out of training (validation_split, validation_dir), if any."""
    pipe: StableDiffusionXLPipeline
    noise_scheduler: DDPMScheduler
    prediction_type: str
    batches: Batches
    schedule: BatchSchedule
    validation_batches: list[Batch]
    """The first examples with their noise drawn once: the fixed-noise loss's data."""
    offloaded: list[torch.nn.Module]
    """Encoders the cache made unnecessary: on the CPU, on the device only to render images."""
    lora_config: dict[str, LoraConfig]
    trained: dict[str, torch.nn.Module]
    """The components with LoRA layers: unet, and both text encoders with text_encoder_lora."""
    dropout_seeds: SampleSeeds
    """Each example's LoRA-dropout seed in the micro-batch being trained (set by `fit`)."""
    params: list[torch.nn.Parameter]
    """The LoRA parameters, what the optimizer updates."""
    unet: torch.nn.Module
    """`pipe.unet` wrapped by accelerate for data parallelism."""
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    checkpoint: Checkpoint | None
    """The checkpoint to resume from; `fit` starts at its step."""
    scorer: ClipScorer | None
    metrics: MetricsLog | None
    """On the main process only."""
    step_flops: float = 0.0

    @property
    def start_step(self) -> int:
        return self.checkpoint.step if self.checkpoint is not None else 0


def train(config: TrainConfig) -> TrainResult:
    """Train an adapter as `config` says and store it: one run, top to bottom."""
    started = time.time()
    run = setup(config)
    base_loss = validate(run, step=0)  # before resuming: LoRA layers start as the identity
    if run.checkpoint is not None:
        resume(run)
    loss = fit(run)
    final_loss = validate(run, step=run.total_steps)
    validation = {"fixed_noise_loss": final_loss, "fixed_noise_loss_base": base_loss}
    return store(run, loss, validation, wall=time.time() - started)


# --- setup


def setup(config: TrainConfig) -> Run:
    """The accelerator, the data with its encodings cached, the base with LoRA layers, the
    optimizer and schedule, the checkpoint to resume from and the metrics log."""
    accelerator = start_accelerator(config.mixed_precision)
    device, main = accelerator.device, accelerator.is_main_process
    dtype = WEIGHT_DTYPES[config.mixed_precision]
    checkpoint = read_checkpoint(config)
    torch.manual_seed(derive_seed(config.seed, "init"))  # LoRA initialisation

    base = get_base(config.base)
    scan, held_out = training_data(config)
    buckets = example_buckets(scan.examples, config)
    log.info(
        "%d examples (%d skipped, %d held out) in %d buckets",
        len(scan.examples),
        len(scan.skipped),
        len(held_out.examples) if held_out is not None else 0,
        len(set(buckets)),
    )
    pipe = load_pipeline(f"store:{base.tag}", dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    prediction_type = config.prediction_type or pipe.scheduler.config.prediction_type
    noise_scheduler = DDPMScheduler.from_config(
        pipe.scheduler.config, prediction_type=prediction_type
    )
    cache = open_cache(config, base, scan, buckets, dtype)
    batches = Batches(pipe, scan.examples, buckets, config, cache)
    offloaded = encode_once(batches, accelerator, dtype)

    lora_config, dropout_seeds = add_trainable_layers(pipe, config, device, dtype)
    trained = {name: getattr(pipe, name) for name in lora_config}
    params = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
    total_steps = config.total_steps(len(scan.examples), accelerator.num_processes)
    optimizer = make_optimizer(config, params, device)
    lr_schedule = make_lr_schedule(config, optimizer, total_steps)
    # Only the UNet is wrapped for data parallelism: the pipeline calls the text encoders directly,
    # so `fit` averages their LoRA gradients (with text_encoder_lora) itself.
    unet, optimizer = accelerator.prepare(pipe.unet, optimizer)
    scorer = None
    if config.validation_clip and main:
        scorer = ClipScorer.from_store(config.validation_clip, device=device)
    metrics = None
    if main:
        resumed_at = checkpoint.step if checkpoint is not None else None
        metrics = MetricsLog(config.run_dir(), config.tensorboard, resume_step=resumed_at)
    run = Run(
        config=config,
        accelerator=accelerator,
        dtype=dtype,
        base=base,
        scan=scan,
        held_out=held_out,
        pipe=pipe,
        noise_scheduler=noise_scheduler,
        prediction_type=prediction_type,
        batches=batches,
        schedule=BatchSchedule(
            buckets, config.global_batch(accelerator.num_processes), config.seed
        ),
        validation_batches=validation_batches(batches, config),
        offloaded=offloaded,
        lora_config=lora_config,
        trained=trained,
        dropout_seeds=dropout_seeds,
        params=params,
        unet=unet,
        optimizer=optimizer,
        lr_schedule=lr_schedule,
        total_steps=total_steps,
        checkpoint=checkpoint,
        scorer=scorer,
        metrics=metrics,
    )
    run.step_flops = count_step_flops(run)
    return run


def start_accelerator(mixed_precision: str) -> Accelerator:
    """A fresh Accelerator; refuses processes that were launched together but did not form a
    group (each would train alone on all the data and store its own adapter)."""
    # A second run in the same process (a notebook, the tests) may ask for another precision;
    # accelerate keeps it in a process-wide singleton, so clear that first (the process group,
    # in PartialState, is kept).
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise TrainingError(
            f"launched as {launched} processes but they did not form a group (world size "
            f"{accelerator.num_processes}); on machines without GPUs set ACCELERATE_USE_CPU=1"
        )
    return accelerator


def read_checkpoint(config: TrainConfig) -> Checkpoint | None:
    """With `resume`, the checkpoint to continue from, refused if another config wrote it."""
    if not config.resume:
        return None
    checkpoint = load_checkpoint(resolve_resume(config.run_dir(), config.resume))
    if checkpoint.state.get("config_fingerprint") != config.fingerprint(exclude=RUNTIME_ONLY):
        raise TrainingError(
            f"{checkpoint.path} was written by a run with other settings; "
            "resume with the same config (only output, logging and store options may change)"
        )
    return checkpoint


def encode_once(
    batches: Batches, accelerator: Accelerator, dtype: torch.dtype
) -> list[torch.nn.Module]:
    """Fill the disk cache with latents and caption embeddings, then move what the cache made
    unnecessary (the VAE, the text encoders) off the accelerator; returns those modules."""
    pipe, config, device = batches.pipe, batches.config, accelerator.device
    pipe.text_encoder.to(device, dtype)
    pipe.text_encoder_2.to(device, dtype)
    pipe.vae.to(device)  # float32: SDXL's VAE overflows in half precision
    with accelerator.main_process_first():
        batches.fill_cache(device, show_progress=accelerator.is_local_main_process)
    offloaded = []
    if config.cache_latents:
        offloaded.append(pipe.vae)
    if config.cache_text_embeddings:
        offloaded += [pipe.text_encoder, pipe.text_encoder_2]
    for module in offloaded:
        module.to("cpu")
    return offloaded


def add_trainable_layers(
    pipe: StableDiffusionXLPipeline, config: TrainConfig, device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, LoraConfig], SampleSeeds]:
    """The UNet on the device with LoRA layers (and on the text encoders with
    text_encoder_lora) whose dropout is seeded per example, gradient checkpointing, attention
    backend and compilation as configured; returns the LoRA configs and the dropout seeds."""
    pipe.unet.to(device, dtype)
    lora_config = add_lora(pipe, config)
    dropout_seeds = seed_dropout({name: getattr(pipe, name) for name in lora_config})
    if config.gradient_checkpointing:
        blocks = enable_checkpointing(pipe.unet, config.checkpoint_blocks)
        log.info("gradient checkpointing in %s", ", ".join(blocks))
    if config.attention == "xformers":
        pipe.unet.enable_xformers_memory_efficient_attention()
    # Last: it traces the LoRA layers and the flags set above.
    if compiled := compile_unet(pipe.unet, config.compile):
        log.info("compiled %d UNet module(s) for training (%s)", compiled, config.compile)
    return lora_config, dropout_seeds


def validation_batches(batches: Batches, config: TrainConfig) -> list[Batch]:
    """The first validation_loss_examples examples, one a batch, their noise drawn once."""
    count = min(config.validation_loss_examples, len(batches.examples))
    return [
        batches.batch(
            [i],
            [torch.Generator().manual_seed(derive_seed(config.seed, "val", i))],
            [random.Random(i)],
        )
        for i in range(count)
    ]


def count_step_flops(run: Run) -> float:
    """FLOPs of one optimizer step on this process, for TFLOP/s and MFU: counted once, at the
    first batch's shape (buckets differ in shape but hold about the same number of pixels)."""
    config, pipe = run.config, run.pipe
    accum = config.gradient_accumulation_steps
    first = run.schedule.batch(run.start_step)[1]
    bucket = run.batches.buckets[first[0]]
    flops = unet_training_flops(
        pipe.unet,
        batch=config.batch_size,
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
    if run.metrics is not None and run.start_step == 0:  # a resumed log keeps the first run's
        run.metrics.write({"step": 0, "flops_per_step": step_flops})
    return step_flops


def resume(run: Run) -> None:
    """The checkpoint's LoRA weights, optimizer and schedule state: `fit` goes on from its step."""
    checkpoint = run.checkpoint
    load_trainable_state(run.trained, checkpoint.trainable)
    run.optimizer.load_state_dict(checkpoint.optimizer)
    run.lr_schedule.load_state_dict(checkpoint.lr_scheduler)
    log.info("resumed from %s at step %d", checkpoint.path, checkpoint.step)


# --- fit


def fit(run: Run) -> float:
    """The optimizer steps from `run.start_step` to the end; returns the last step's loss.

    Step s trains on the global batch the schedule gives for (seed, s); each process's
    micro-batches are slices of it, and every example's randomness (latent sample, noise,
    timestep, flip, LoRA dropout) comes from seeds derived from (seed, s, its place in the global
    batch). So a resumed run computes exactly the steps an uninterrupted one would, and any split
    of the same global batch into processes × micro-batches × batch size trains the same weights.
    """
    config, accelerator, total = run.config, run.accelerator, run.total_steps
    accum, world = config.gradient_accumulation_steps, accelerator.num_processes
    progress = tqdm(
        total=total,
        initial=run.start_step,
        desc="training",
        disable=not accelerator.is_local_main_process,
    )
    loss = float("nan")
    for step in range(run.start_step, total):
        started = time.time()
        epoch, examples = run.schedule.batch(step)
        micro_losses = []
        for micro in range(accum):
            batch, generators = micro_batch(run, step, examples, micro)
            # Gradients are summed locally and synchronised once, at the step's last micro-batch.
            last = micro == accum - 1
            sync = contextlib.nullcontext() if last else accelerator.no_sync(run.unet)
            with sync, accelerator.autocast():
                micro_loss = denoising_loss(
                    run.pipe,
                    run.unet,
                    run.noise_scheduler,
                    batch,
                    generators=generators,
                    prediction_type=run.prediction_type,
                    snr_gamma=config.snr_gamma,
                    noise_offset=config.noise_offset,
                    device=accelerator.device,
                    dtype=run.dtype,
                )
                accelerator.backward(micro_loss / accum)
            micro_losses.append(micro_loss.detach())
        if world > 1:
            average_encoder_gradients(run)
        loss = accelerator.gather(torch.stack(micro_losses).mean()[None]).mean().item()
        if not math.isfinite(loss):
            raise TrainingError(
                f"loss is {loss} at step {step + 1} (epoch {epoch}); stopping. Lower "
                "learning_rate, use bf16 instead of fp16, or check the data; nothing was stored"
            )
        grad_norm = float("nan")
        if config.max_grad_norm:
            grad_norm = float(accelerator.clip_grad_norm_(run.params, config.max_grad_norm))
        run.optimizer.step()
        run.lr_schedule.step()
        run.optimizer.zero_grad(set_to_none=True)

        done = step + 1
        # A step's time is its own: not the checkpoint or validation after it.
        log_step(run, progress, done, epoch, loss, grad_norm, seconds=time.time() - started)
        if due(config.checkpoint_every, done, total):
            checkpoint(run, done, loss)
        if due(config.validation_every, done, total):
            validate(run, done)
    progress.close()
    return loss


def micro_batch(
    run: Run, step: int, examples: list[int], micro: int
) -> tuple[Batch, list[torch.Generator]]:
    """This process's micro-batch `micro` of step `step`'s global batch `examples`, with each
    example's generator (latent sample, then noise and timestep); sets its dropout seeds.

    The global batch is cut into processes × accumulation slices of batch_size; slice
    micro × processes + rank is this one's.
    """
    config, accelerator = run.config, run.accelerator
    size = config.batch_size
    part = micro * accelerator.num_processes + accelerator.process_index
    places = range(part * size, (part + 1) * size)
    generators = [
        torch.Generator().manual_seed(derive_seed(config.seed, "noise", step, p)) for p in places
    ]
    rngs = [random.Random(derive_seed(config.seed, "aug", step, p)) for p in places]
    run.dropout_seeds.seeds = tuple(derive_seed(config.seed, "dropout", step, p) for p in places)
    batch = run.batches.batch([examples[p] for p in places], generators, rngs)
    return batch, generators


def due(every: int, step: int, total: int) -> bool:
    """Whether a periodic checkpoint or validation falls on `step` (the last step has its own)."""
    return bool(every) and step % every == 0 and step < total


def average_encoder_gradients(run: Run) -> None:
    """Mean of the text encoders' LoRA gradients across processes (accelerate only wraps the
    UNet, so only its gradients are synchronised by the backward pass)."""
    for name, module in run.trained.items():
        if name == "unet":
            continue
        for param in module.parameters():
            if param.requires_grad:
                param.grad = run.accelerator.reduce(param.grad, reduction="mean")


def log_step(
    run: Run,
    progress: tqdm,
    step: int,
    epoch: int,
    loss: float,
    grad_norm: float,
    *,
    seconds: float,
) -> None:
    """Loss, learning rate, it/s, TFLOP/s and MFU in the progress bar; those and images/s, the
    gradient norm and peak memory in the metrics, every log_every steps and at the end."""
    config = run.config
    it_s = 1.0 / max(seconds, 1e-9)
    speed = {"tflops": run.step_flops * it_s / 1e12}
    if config.peak_tflops:
        speed["mfu"] = speed["tflops"] / config.peak_tflops
    lr = run.lr_schedule.get_last_lr()[0]
    shown = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "it_s": f"{it_s:.2f}"}
    shown["tflops"] = f"{speed['tflops']:.3g}"
    if "mfu" in speed:
        shown["mfu"] = f"{speed['mfu']:.1%}"
    progress.update(1)
    progress.set_postfix(shown)
    if run.metrics is None or (step % config.log_every and step != run.total_steps):
        return
    images_per_step = (
        config.batch_size * config.gradient_accumulation_steps * run.accelerator.num_processes
    )
    run.metrics.write(
        {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "it_s": it_s,
            "images_s": it_s * images_per_step,
            **speed,
            "peak_memory_gb": peak_memory_gb(run.accelerator.device),
        }
    )


def checkpoint(run: Run, step: int, loss: float) -> None:
    """A resumable checkpoint of `step`, written by the main process once the weights are
    known to be finite (a broken state must not become the one `--resume latest` picks)."""
    trainable = trainable_state(run.trained)
    check_weights_finite(trainable, step)
    if run.accelerator.is_main_process:
        config = run.config
        save_checkpoint(
            config.run_dir(),
            step,
            trainable,
            run.optimizer.state_dict(),
            run.lr_schedule.state_dict(),
            {"config_fingerprint": config.fingerprint(exclude=RUNTIME_ONLY), "loss": loss},
            config.keep_checkpoints,
        )
    run.accelerator.wait_for_everyone()


# --- validate


def validate(run: Run, step: int) -> float:
    """The fixed-noise loss at `step` and, with validation_prompts, the validation images of
    `step` with their CLIP score, into the metrics; returns the loss.

    At step 0 this is the base (LoRA layers start as the identity). A resumed run computes it
    again, for the adapter's metadata, but its log and images already hold it.
    """
    with lora_dropout_off(run):
        loss = fixed_noise_loss(run)
        if step == 0 and run.start_step:
            return loss
        paths = []
        if run.config.validation_prompts and run.accelerator.is_main_process:
            paths = render(run, step)
    if run.metrics is not None:
        run.metrics.write({"step": step, "validation_loss": loss})
    if paths and run.scorer is not None:
        images = [Image.open(p) for p in paths]
        scores = run.scorer.clip_scores(images, run.config.validation_prompts).diagonal()
        run.metrics.write({"step": step, "clip_score": float(scores.mean())})
    return loss


@contextlib.contextmanager
def lora_dropout_off(run: Run):
    """Validation measures the adapter, not dropout noise: peft creates LoRA's dropout layers in
    training mode inside the eval-mode pipeline, so they are switched off while it runs and back
    on for training."""
    dropouts = [
        module
        for model in run.trained.values()
        for module in model.modules()
        if isinstance(module, torch.nn.Dropout) and module.training
    ]
    for module in dropouts:
        module.eval()
    try:
        yield
    finally:
        for module in dropouts:
            module.train()


@torch.no_grad()
def fixed_noise_loss(run: Run) -> float:
    """Mean denoising loss over the validation batches at FIXED_TIMESTEPS, the noise drawn from
    VALIDATION_SEED, without min-SNR weights or offset noise: the same numbers every time."""
    total, count = 0.0, 0
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    with eager():
        for batch in run.validation_batches:
            for t in FIXED_TIMESTEPS:
                timesteps = torch.full((batch.latents.shape[0],), t, dtype=torch.long)
                loss = denoising_loss(
                    run.pipe,
                    run.pipe.unet,
                    run.noise_scheduler,
                    batch,
                    generators=[generator],
                    prediction_type=run.prediction_type,
                    snr_gamma=0.0,
                    noise_offset=0.0,
                    device=run.accelerator.device,
                    dtype=run.dtype,
                    timesteps=timesteps,
                )
                total += float(loss)
                count += 1
    return total / max(count, 1)


@torch.no_grad()
def render(run: Run, step: int) -> list[Path]:
    """Each validation prompt i from seed VALIDATION_SEED + i (the same every validation) into
    `validation/step-<step>/<i>.png`; the offloaded encoders come back for it."""
    config, device = run.config, run.accelerator.device
    out_dir = config.run_dir() / "validation" / f"step-{step:08d}"
    out_dir.mkdir(parents=True, exist_ok=True)
    for module in run.offloaded:
        module.to(device)
    paths = []
    with eager():
        for i, prompt in enumerate(config.validation_prompts):
            image = run.pipe(
                prompt,
                height=config.resolution,
                width=config.resolution,
                num_inference_steps=config.validation_inference_steps,
                guidance_scale=config.validation_guidance,
                generator=torch.Generator("cpu").manual_seed(VALIDATION_SEED + i),
            ).images[0]
            paths.append(out_dir / f"{i:02d}.png")
            image.save(paths[-1])
    for module in run.offloaded:
        module.to("cpu")
    return paths


# --- store


def store(run: Run, loss: float, validation: dict, *, wall: float) -> TrainResult:
    """Check the LoRA weights, write them to `final/`, store the adapter, write the report."""
    config, accelerator, total = run.config, run.accelerator, run.total_steps
    if run.metrics is not None:
        run.metrics.write({"step": total, "wall_time_s": wall})
        run.metrics.close()
    layers = diffusers_layers(run.trained)
    for component, tensors in layers.items():
        check_weights_finite({f"{component}.{k}": v for k, v in tensors.items()}, total)
    lora_dicts = {k: v.to_dict() for k, v in run.lora_config.items()}
    tag = None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # Written before storing, so the trained weights survive a store that cannot take them
        # (a full disk), and a run with `store` off still leaves its result: diffusers'
        # `load_lora_weights` reads the folder as is.
        kept = write_lora_file(config.run_dir() / "final", layers, lora_dicts)
        if config.store:
            info = adapter_info(run, loss, validation, wall)
            try:
                tag = save_adapter(config.name, layers, info, lora_config=lora_dicts).tag
            except StoreError as err:
                raise TrainingError(f"{err}. The trained weights are kept in {kept}") from err
        write_report(
            config.run_dir(),
            config=config.to_dict(),
            dataset=dataset_summary(run),
            summary={
                "adapter": tag or "(not stored)",
                "steps": total,
                "final_loss": loss,
                **validation,
                "wall_time_s": round(wall, 2),
                "weights": str(kept),
            },
            prompts=config.validation_prompts,
        )
    accelerator.wait_for_everyone()
    return TrainResult(tag, total, loss, validation, wall, config.run_dir())


def adapter_info(run: Run, loss: float, validation: dict, wall: float) -> AdapterInfo:
    """The adapter's metadata in the store: its base, LoRA settings, config, data and results."""
    config = run.config
    return AdapterInfo(
        base_tag=run.base.tag,
        base_hash=run.base.metadata["content_hash"],
        rank=config.rank,
        alpha=config.alpha,
        dropout=config.dropout,
        target_modules=list(config.target_modules),
        text_encoder_lora=config.text_encoder_lora,
        training_config=config.to_dict(),
        dataset=dataset_summary(run),
        steps=run.total_steps,
        final_loss=loss,
        validation=validation,
        wall_time_s=round(wall, 2),
        processes=run.accelerator.num_processes,
    )


# --- small parts


def dataset_summary(run: Run) -> dict:
    """The training data's summary and, under `held_out`, the held-out images: where they are,
    their captions and each file's sha256 (what `python -m train evaluate` reads by default)."""
    summary = run.scan.summary()
    if run.held_out is not None:
        summary["held_out"] = {**run.held_out.summary(), **run.held_out.listing()}
    return summary


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


# --- the UNet's speed options


def unet_blocks(unet: UNet2DConditionModel) -> dict[str, torch.nn.Module]:
    """The UNet's down, mid and up blocks by module name (down_blocks.0, …, mid_block, up_blocks.N)."""
    blocks = {f"down_blocks.{i}": b for i, b in enumerate(unet.down_blocks)}
    if unet.mid_block is not None:
        blocks["mid_block"] = unet.mid_block
    blocks.update({f"up_blocks.{i}": b for i, b in enumerate(unet.up_blocks)})
    return blocks


def select_blocks(unet: UNet2DConditionModel, names: tuple[str, ...]) -> list[str]:
    """The block names that `names` (as in `checkpoint_blocks`) stand for, in UNet order."""
    blocks = list(unet_blocks(unet))
    chosen: set[str] = set()
    unknown = []
    for name in names:
        matches = [b for b in blocks if name == "all" or b == name or b.startswith(name + ".")]
        if not matches:
            unknown.append(name)
        chosen.update(matches)
    if unknown:
        raise ValueError(
            f"checkpoint_blocks: this UNet has no block {', '.join(repr(u) for u in unknown)}; "
            f"it has {', '.join(blocks)}"
        )
    return [b for b in blocks if b in chosen]


def enable_checkpointing(unet: UNet2DConditionModel, names: tuple[str, ...]) -> list[str]:
    """Gradient checkpointing in the chosen blocks only; returns their names.

    diffusers keeps a `gradient_checkpointing` flag on each down/mid/up block (it then recomputes
    the block's ResNets) and on each Transformer2DModel inside one (it then recomputes each
    transformer layer), and `enable_gradient_checkpointing` sets them all. Here it sets them all,
    which also installs the checkpoint function, then clears the flags outside the chosen blocks.
    """
    chosen = select_blocks(unet, names)
    unet.enable_gradient_checkpointing(_checkpoint)
    for name, module in unet.named_modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = any(
                name == block or name.startswith(block + ".") for block in chosen
            )
    return chosen


def _checkpoint(module: torch.nn.Module, *args: object) -> object:
    """diffusers' default checkpoint function without its torch-version check, which torch.compile
    would trace (and warn about: it is behind an lru_cache) at every checkpointed call."""
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


def eager() -> contextlib.AbstractContextManager:
    """A context in which compiled modules run eager: validation and rendering, which would
    otherwise compile the UNet again (no gradients, other batch sizes) for a handful of calls.

    (`torch.compiler.set_stance` takes effect when called, so it is made here, at the `with`.)
    """
    return torch.compiler.set_stance("force_eager")

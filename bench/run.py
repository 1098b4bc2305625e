"""Serving and training speed of this project against plain diffusers, one table.

    python -m bench.run --device cpu --out runs/bench          # the tiny model, a harness check
    python -m bench.run --device cuda --out $OUT/bench         # full-size SDXL, bf16

Everything goes into a temporary BentoML store: the base, a tiny CLIP and two random rank-8
LoRA adapters. See bench/RESULTS.md for the figures and the exact GPU command.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

if not __package__:  # `python bench/run.py`: import the project, not bench/'s siblings
    sys.path[0] = str(Path(__file__).resolve().parent.parent)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--model", choices=("tiny", "full"), help="default: full on cuda, tiny on cpu")
    p.add_argument("--size", type=int, help="image side in pixels (default 1024 full, 64 tiny)")
    p.add_argument("--steps", type=int, help="denoising steps (default 30 full, 4 tiny)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale (>1: 2 UNet passes)")
    p.add_argument("--batch", type=int, default=4, help="images per pipeline call / train step")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per in-process row")
    p.add_argument("--concurrency", default="1,4,16", help="HTTP clients in flight, per row")
    p.add_argument("--requests", type=int, default=8, help="HTTP requests per row (≥ concurrency)")
    p.add_argument(
        "--http-warmup",
        type=int,
        default=12,
        help="requests before the HTTP rows (batcher learning)",
    )
    p.add_argument("--rank", type=int, default=8, help="rank of the served random adapters")
    p.add_argument(
        "--mixed-adapters",
        default="1,4,16",
        help="distinct adapters in the traffic of the mixed-batch rows (engine and HTTP); "
        "empty: no such rows",
    )
    p.add_argument("--train-rank", type=int, default=16, help="LoRA rank in the training rows")
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps per row")
    p.add_argument(
        "--peak-tflops", type=float, default=790.0, help="peak for the floor (H100 bf16)"
    )
    p.add_argument(
        "--speed",
        help="the service's speed settings for the 'engine (…)' rows and the HTTP server, e.g. "
        "compile=blocks,fuse_qkv,channels_last,cuda_graphs,encode_workers=8; none for none (default: "
        "compile=blocks,fuse_qkv,channels_last,encode_workers=8 on cuda, none on cpu)",
    )
    p.add_argument(
        "--fp8",
        choices=("off", "dynamic", "weight"),
        default="off",
        help="one more engine section: the --speed options with BENTOLORA_FP8 set to this "
        "(its images against eager diffusers: PSNR in the correctness table)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="results.json + .md here")
    p.add_argument("--skip-serve", action="store_true", help="no serving rows (in-process or HTTP)")
    p.add_argument("--skip-diffusers", action="store_true", help="no plain-diffusers rows")
    p.add_argument("--skip-engine", action="store_true", help="no in-process engine rows")
    p.add_argument("--skip-http", action="store_true", help="no HTTP rows")
    p.add_argument("--skip-train", action="store_true", help="no training rows")
    p.add_argument(
        "--open-loop",
        default="0.3,0.6,0.9",
        help="load fractions of the open-loop rows (request-level vs step scheduling); "
        "empty: no such rows",
    )
    p.add_argument("--open-loop-requests", type=int, default=24, help="requests per open-loop load")
    p.add_argument(
        "--open-loop-where",
        choices=("process", "http", "both"),
        default="process",
        help="open-loop rows in process (request-level vs step, the service's own entries), "
        "over HTTP (a server each for request-level, step behind the async /generate, step "
        "behind BentoML's batchable /generate: BENTOLORA_STEP_ENTRY), or both",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile one engine call with an adapter per engine section (profile-*.txt)",
    )
    p.add_argument("--server-timeout", type=float, default=600.0, help="seconds to /readyz")
    p.add_argument("--keep-store", action="store_true", help="keep the temporary store")
    args = p.parse_args(argv)
    from models.device import resolve_device

    args.device = resolve_device(args.device)
    args.model = args.model or ("full" if args.device == "cuda" else "tiny")
    full = args.model == "full"
    args.size = args.size or (1024 if full else 64)
    args.steps = args.steps or (30 if full else 4)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.mixed_adapters = [int(k) for k in args.mixed_adapters.split(",") if k.strip()]
    args.open_loop = [float(f) for f in args.open_loop.split(",") if f.strip()]
    if any(not 0 < f < 2 for f in args.open_loop):
        p.error(f"--open-loop {args.open_loop}: fractions of capacity in (0, 2)")
    if any(k < 1 for k in args.mixed_adapters):
        p.error(f"--mixed-adapters {args.mixed_adapters}: each at least 1")
    if args.size % 8 or args.size < 64:
        p.error(f"--size {args.size}: a multiple of 8, at least 64")
    if args.speed is None:
        args.speed = (
            "compile=blocks,fuse_qkv,channels_last,encode_workers=8"
            if args.device == "cuda"
            else "none"
        )
    try:
        args.speed = parse_speed(args.speed)
    except ValueError as err:
        p.error(f"--speed: {err}")
    return args


def parse_speed(text: str) -> dict:
    """`compile=blocks,fuse_qkv` → {"compile": "blocks", "fuse_qkv": True}, read and checked as
    the service reads its BENTOLORA_* variables."""
    from dataclasses import fields

    from service.settings import Settings

    raw: dict[str, str] = {}
    for item in text.split(","):
        key, _, value = item.strip().partition("=")
        if key and key != "none":
            raw[key] = value or "1"
    known = {f.name for f in fields(Settings)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown settings {', '.join(unknown)}")
    settings = Settings.from_env({f"BENTOLORA_{k.upper()}": v for k, v in raw.items()})
    return {k: getattr(settings, k) for k in raw}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="bentolora-bench-"))
    # Before anything imports bentoml: the benchmark never touches the user's store.
    os.environ["BENTOML_HOME"] = str(home / "bentoml")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return _run(args, home)
    finally:
        if not args.keep_store:
            shutil.rmtree(home, ignore_errors=True)


def _run(args: argparse.Namespace, home: Path) -> int:  # noqa: C901 - the sections in order
    import torch

    from bench import fixtures, pipelines, report, server, training
    from bench.measure import Row, image_diff
    from models.adapter import get_adapter

    device = args.device
    header = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": _device_name(device),
        "torch": torch.__version__,
        "model": args.model,
        "command": "python -m bench.run " + " ".join(sys.argv[1:]),
        "size": args.size,
        "steps": args.steps,
        "guidance": args.guidance,
        "batch": args.batch,
        "peak_tflops": args.peak_tflops if device == "cuda" else None,
        "speed": args.speed,
        "fp8": args.fp8,
    }
    speed = dict(args.speed)
    if speed:  # compiled in process first, so the server starts with the compile cache warm
        speed |= {"warmup": True, "compile_cache": str(home / "inductor-cache")}
    rows: list[Row] = []
    correctness: dict = {}

    def save() -> str:
        report.set_ratios(rows)
        return report.write(args.out, header, rows, correctness)

    @contextlib.contextmanager
    def section(name: str) -> Iterator[None]:
        """Time a section; a failing one is logged and recorded, and the next ones still run
        (one GPU call must bring back whatever could be measured)."""
        started = time.perf_counter()
        try:
            yield
        except Exception as err:
            logging.getLogger("bench").exception("section %s failed", name)
            header.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"[:2000]
        finally:
            header.setdefault("section_s", {})[name] = round(time.perf_counter() - started, 2)

    base, times = fixtures.build_base(args.model, device)
    header["base_build_s"], header["base_save_s"] = (
        round(times["build_s"], 2),
        round(times["save_s"], 2),
    )
    fixtures.build_clip()
    work = pipelines.Workload(args.size, args.steps, args.batch, args.guidance, args.repeats)

    pipe, header["baseline_load_s"] = pipelines.load_baseline(base, device)
    flops = None
    try:
        flops = _flops(pipe, args)
        header["flops"] = flops
        header["tflop_per_image"] = round(flops["per_image"] / 1e12, 4)
    except Exception as err:  # a FLOP count is a nicety; the timings stand without it
        logging.getLogger("bench").warning("FLOP count failed: %s", err)
    count = max([2, *args.mixed_adapters])
    adapters = [
        e.name.removeprefix("lora-")
        for e in fixtures.build_adapters(base, pipe.unet, args.rank, count)
    ]

    reference: dict[str, list] = {}
    if not args.skip_serve and not args.skip_diffusers:
        with section("diffusers"):
            reference_rows, reference = pipelines.baseline_rows(
                pipe, get_adapter(adapters[0]), work, device
            )
            _add(rows, reference_rows, flops, work)
            if (
                "lora" in reference
            ):  # how far the adapter moves the image: the diffs below are small next to it
                correctness["diffusers"] = {
                    "lora vs no lora": image_diff(reference["plain"], reference["lora"])
                }
    del pipe
    _free()
    engines = [("engine", "engine_start_s", {})]
    if speed:
        engines.append(("engine fast", "engine_fast_start_s", speed))
    if args.fp8 != "off":
        engines.append(("engine fp8", "engine_fp8_start_s", speed | {"fp8": args.fp8}))
    for section_name, start_key, settings in [] if args.skip_serve or args.skip_engine else engines:
        save()
        with section(section_name):
            engine, header[start_key] = pipelines.make_engine(device, args.batch, settings)
            described = engine.settings.speed_options().describe()
            label = f" ({described})" if settings else ""
            try:
                engine_rows, images = pipelines.engine_rows(engine, adapters, work, device, label)
                engine_rows += pipelines.mixed_rows(
                    engine, adapters, work, device, args.mixed_adapters, label
                )
                if args.profile:
                    header.setdefault("profiles", []).append(
                        pipelines.profile_engine(engine, adapters, work, device, args.out, label)
                    )
            finally:
                del engine
            _add(rows, engine_rows, flops, work)
            correctness["engine" + label] = pipelines.correctness(reference, images)
        _free()
    if args.mixed_adapters and not (args.skip_serve or args.skip_engine):
        with section("engine grouped"):  # before per-image LoRA: one call per adapter set
            engine, _ = pipelines.make_engine(device, args.batch, {"mixed_max_rank": 0})
            try:
                _add(
                    rows,
                    pipelines.mixed_rows(
                        engine, adapters, work, device, args.mixed_adapters, " (grouped by set)"
                    ),
                    flops,
                    work,
                )
            finally:
                del engine
        _free()
    save()
    if not args.skip_serve and not args.skip_http:
        with section("http"):
            proc, url, header["server_cold_start_s"] = server.start(
                device, args.batch, args.out / "server.log", args.server_timeout, speed
            )
            try:
                http = {
                    "plain": server.first_images(url, work, min(args.batch, 2), None),
                    "lora": server.first_images(url, work, min(args.batch, 2), adapters[0]),
                }
                correctness["http"] = pipelines.correctness(reference, http)
                header["server_warmup_requests_s"] = server.warm_up(
                    url, work, args.http_warmup, adapters
                )
                http_rows = server.http_rows(
                    url,
                    proc.pid,
                    work,
                    device,
                    args.concurrency,
                    args.requests,
                    adapters,
                    args.mixed_adapters,
                )
            finally:
                server.stop(proc)
            _add(rows, http_rows, flops, work)
        save()
    if args.open_loop and not args.skip_serve and args.open_loop_where != "http":
        from bench.open_loop import open_loop_rows

        with section("open loop"):
            _add(
                rows,
                open_loop_rows(
                    device,
                    args.batch,
                    work,
                    adapters[:2],
                    args.open_loop,
                    args.open_loop_requests,
                    {k: v for k, v in speed.items() if k != "warmup"} or None,
                ),
                flops,
                work,
            )
        _free()
        save()
    if args.open_loop and not args.skip_serve and args.open_loop_where != "process":
        from bench.open_loop import http_open_loop_rows

        with section("open loop http"):
            _add(
                rows,
                http_open_loop_rows(
                    device,
                    args.batch,
                    work,
                    adapters[:2],
                    args.open_loop,
                    args.open_loop_requests,
                    args.out,
                    args.server_timeout,
                    speed,
                ),
                flops,
                work,
            )
        save()
    if not args.skip_train:
        train_work = training.TrainWork(args.size, args.batch, args.train_steps, args.train_rank)
        train_rows = []
        with section("train plain"):
            train_rows.append(training.plain_loop(base, train_work, device))
        _free()
        with section("train project"):
            train_rows.extend(training.project_rows(base, train_work, device, home / "train"))
        _free()
        plain = next((r for r in train_rows if r.name.startswith("plain")), None)
        project = next((r for r in train_rows if r.name.startswith("project train,")), None)
        if plain is not None and project is not None:
            project.baseline = plain.name
            # The same LoRA step: the trainer's own count (forward + backward as autograd runs
            # it, ≈ 2.1 forward passes since frozen weights get no weight gradients).
            plain.flops_per_image = project.flops_per_image
        rows.extend(train_rows)

    markdown = save()
    print(markdown)
    print(f"\nwritten: {args.out / 'results.json'}, {args.out / 'results.md'}")
    return 1 if header.get("errors") else 0


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    cores = f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"cpu ({platform.machine()}, {cores})"


def _flops(pipe, args) -> dict[str, float]:
    from bench.measure import image_flops

    return image_flops(pipe, size=args.size, steps=args.steps, guidance=args.guidance)


def _batch_baseline(row, work) -> str:
    """Batch-1 rows and one-at-a-time HTTP compare with eager batch 1; the engine's adapter rows
    with the same engine without an adapter (the cost of serving one); the rest with eager."""
    if row.baseline or row.section == "open loop":  # set where the row was made
        return row.baseline or row.name
    for marker in (" + LoRA,", ", LoRA switching a/b,"):
        if row.name.startswith("engine") and marker in row.name:
            return row.name.replace(marker, ",")
    single = row.name.endswith("batch 1") or row.extra.get("concurrency") == 1
    return f"diffusers eager, batch {1 if single else work.batch}"


def _add(rows, new, flops, work) -> None:
    for row in new:
        if flops:
            row.flops_per_image = flops["per_image"]
        if row.name != _batch_baseline(row, work):
            row.baseline = _batch_baseline(row, work)
        rows.append(row)


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())

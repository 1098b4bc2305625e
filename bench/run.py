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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass
class Bench:
    """One benchmark run: its arguments, the header, rows and image comparisons it writes after
    every section, and what the sections share (the work, the FLOP count, the adapters' names,
    the eager diffusers images)."""

    args: argparse.Namespace
    home: Path
    header: dict
    speed: dict
    """The fast rows' and the server's settings (`--speed`, warmed up, with a compile cache)."""
    rows: list = field(default_factory=list)
    correctness: dict = field(default_factory=dict)
    work: Any = None
    flops: dict | None = None
    adapters: list[str] = field(default_factory=list)
    reference: dict[str, list] = field(default_factory=dict)
    """The eager diffusers images (plain, lora) every other path is compared with."""

    def save(self) -> str:
        from bench import report

        report.set_ratios(self.rows)
        return report.write(self.args.out, self.header, self.rows, self.correctness)

    def add(self, new) -> None:
        _add(self.rows, new, self.flops, self.work)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Time a section; a failing one is logged and recorded, and the next ones still run
        (one GPU call must bring back whatever could be measured)."""
        started = time.perf_counter()
        try:
            yield
        except Exception as err:
            logging.getLogger("bench").exception("section %s failed", name)
            self.header.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"[:2000]
        finally:
            self.header.setdefault("section_s", {})[name] = round(time.perf_counter() - started, 2)


def _run(args: argparse.Namespace, home: Path) -> int:
    """The sections in order of value; results are rewritten after each."""
    import torch

    header = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": _device_name(args.device),
        "torch": torch.__version__,
        "model": args.model,
        "command": "python -m bench.run " + " ".join(sys.argv[1:]),
        "size": args.size,
        "steps": args.steps,
        "guidance": args.guidance,
        "batch": args.batch,
        "peak_tflops": args.peak_tflops if args.device == "cuda" else None,
        "speed": args.speed,
        "fp8": args.fp8,
    }
    speed = dict(args.speed)
    if speed:  # compiled in process first, so the server starts with the compile cache warm
        speed |= {"warmup": True, "compile_cache": str(home / "inductor-cache")}
    bench = Bench(args, home, header, speed)
    base = _prepare(bench)
    serve = not args.skip_serve
    if serve and not args.skip_engine:
        _engine_sections(bench)
    bench.save()
    if serve and not args.skip_http:
        _http_section(bench)
        bench.save()
    if serve and args.open_loop:
        _open_loop_sections(bench)
    if not args.skip_train:
        _train_sections(bench, base)
    markdown = bench.save()
    print(markdown)
    print(f"\nwritten: {args.out / 'results.json'}, {args.out / 'results.md'}")
    return 1 if header.get("errors") else 0


def _prepare(bench: Bench):
    """The base and CLIP in the temporary store, the FLOP count, the random adapters, and the
    diffusers rows with their reference images. Returns the base's store entry."""
    from bench import fixtures, pipelines
    from bench.measure import image_diff
    from models.adapter import get_adapter

    args, header = bench.args, bench.header
    base, times = fixtures.build_base(args.model, args.device)
    header["base_build_s"] = round(times["build_s"], 2)
    header["base_save_s"] = round(times["save_s"], 2)
    fixtures.build_clip()
    bench.work = pipelines.Workload(args.size, args.steps, args.batch, args.guidance, args.repeats)
    pipe, header["baseline_load_s"] = pipelines.load_baseline(base, args.device)
    try:
        bench.flops = _flops(pipe, args)
        header["flops"] = bench.flops
        header["tflop_per_image"] = round(bench.flops["per_image"] / 1e12, 4)
    except Exception as err:  # a FLOP count is a nicety; the timings stand without it
        logging.getLogger("bench").warning("FLOP count failed: %s", err)
    count = max([2, *args.mixed_adapters])
    bench.adapters = [
        e.name.removeprefix("lora-")
        for e in fixtures.build_adapters(base, pipe.unet, args.rank, count)
    ]
    if not args.skip_serve and not args.skip_diffusers:
        with bench.section("diffusers"):
            rows, bench.reference = pipelines.baseline_rows(
                pipe, get_adapter(bench.adapters[0]), bench.work, args.device
            )
            bench.add(rows)
            if "lora" in bench.reference:  # how far the adapter moves the image: the diffs
                # below are small next to it
                bench.correctness["diffusers"] = {
                    "lora vs no lora": image_diff(bench.reference["plain"], bench.reference["lora"])
                }
    del pipe
    _free()
    return base


def _engine_sections(bench: Bench) -> None:
    """The in-process engine: eager, with the --speed options, with --fp8; then the mixed rows
    grouped by adapter set (one call per set, no per-image LoRA)."""
    from bench import pipelines

    args, work, adapters = bench.args, bench.work, bench.adapters
    engines = [("engine", "engine_start_s", {})]
    if bench.speed:
        engines.append(("engine fast", "engine_fast_start_s", bench.speed))
    if args.fp8 != "off":
        engines.append(("engine fp8", "engine_fp8_start_s", bench.speed | {"fp8": args.fp8}))
    for section_name, start_key, settings in engines:
        bench.save()
        with bench.section(section_name):
            engine, bench.header[start_key] = pipelines.make_engine(
                args.device, args.batch, settings
            )
            described = engine.settings.speed_options().describe()
            label = f" ({described})" if settings else ""
            try:
                rows, images = pipelines.engine_rows(engine, adapters, work, args.device, label)
                rows += pipelines.mixed_rows(
                    engine, adapters, work, args.device, args.mixed_adapters, label
                )
                if args.profile:
                    bench.header.setdefault("profiles", []).append(
                        pipelines.profile_engine(
                            engine, adapters, work, args.device, args.out, label
                        )
                    )
            finally:
                del engine
            bench.add(rows)
            bench.correctness["engine" + label] = pipelines.correctness(bench.reference, images)
        _free()
    if args.mixed_adapters:
        with bench.section("engine grouped"):  # before per-image LoRA: one call per adapter set
            engine, _ = pipelines.make_engine(args.device, args.batch, {"mixed_max_rank": 0})
            try:
                bench.add(
                    pipelines.mixed_rows(
                        engine,
                        adapters,
                        work,
                        args.device,
                        args.mixed_adapters,
                        " (grouped by set)",
                    )
                )
            finally:
                del engine
        _free()


def _http_section(bench: Bench) -> None:
    """The service over HTTP: cold start, its images, then the rows per concurrency."""
    from bench import pipelines, server

    args, work, adapters, header = bench.args, bench.work, bench.adapters, bench.header
    with bench.section("http"):
        proc, url, header["server_cold_start_s"] = server.start(
            args.device, args.batch, args.out / "server.log", args.server_timeout, bench.speed
        )
        try:
            http = {
                "plain": server.first_images(url, work, min(args.batch, 2), None),
                "lora": server.first_images(url, work, min(args.batch, 2), adapters[0]),
            }
            bench.correctness["http"] = pipelines.correctness(bench.reference, http)
            header["server_warmup_requests_s"] = server.warm_up(
                url, work, args.http_warmup, adapters
            )
            rows = server.http_rows(
                url,
                proc.pid,
                work,
                args.device,
                args.concurrency,
                args.requests,
                adapters,
                args.mixed_adapters,
            )
        finally:
            server.stop(proc)
        bench.add(rows)


def _open_loop_sections(bench: Bench) -> None:
    """Request-level against step scheduling under Poisson arrivals, in process and/or over
    HTTP (`--open-loop-where`)."""
    from bench.open_loop import http_open_loop_rows, open_loop_rows

    args, work = bench.args, bench.work
    common = (args.device, args.batch, work, bench.adapters[:2], args.open_loop)
    if args.open_loop_where != "http":
        settings = {k: v for k, v in bench.speed.items() if k != "warmup"} or None
        with bench.section("open loop"):
            bench.add(open_loop_rows(*common, args.open_loop_requests, settings))
        _free()
        bench.save()
    if args.open_loop_where != "process":
        with bench.section("open loop http"):
            bench.add(
                http_open_loop_rows(
                    *common,
                    args.open_loop_requests,
                    args.out,
                    args.server_timeout,
                    bench.speed,
                )
            )
        bench.save()


def _train_sections(bench: Bench, base) -> None:
    """A plain peft loop against the project's trainer, the same LoRA step."""
    from bench import training

    args = bench.args
    work = training.TrainWork(args.size, args.batch, args.train_steps, args.train_rank)
    rows = []
    with bench.section("train plain"):
        rows.append(training.plain_loop(base, work, args.device))
    _free()
    with bench.section("train project"):
        rows.extend(training.project_rows(base, work, args.device, bench.home / "train"))
    _free()
    plain = next((r for r in rows if r.name.startswith("plain")), None)
    project = next((r for r in rows if r.name.startswith("project train,")), None)
    if plain is not None and project is not None:
        project.baseline = plain.name
        # The same LoRA step: the trainer's own count (forward + backward as autograd runs
        # it, ≈ 2.1 forward passes since frozen weights get no weight gradients).
        plain.flops_per_image = project.flops_per_image
    bench.rows.extend(rows)


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

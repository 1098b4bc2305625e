"""The benchmark harness runs end to end on a CPU with the tiny model (a harness check: no speed
is asserted, only that every row is there, its numbers make sense and the images match)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

ROWS = [
    "diffusers eager, batch 1",
    "diffusers eager, batch 2",
    "diffusers eager + LoRA r8, batch 2",
    "engine, batch 1",
    "engine, batch 2",
    "engine + LoRA, batch 2",
    "engine, LoRA switching a/b, batch 2",
    "engine, batch 2, 1 adapters in the traffic",
    "engine, batch 2, 2 adapters in the traffic",
    "engine (fuse_qkv, channels_last), batch 1",
    "engine (fuse_qkv, channels_last), batch 2",
    "engine (fuse_qkv, channels_last) + LoRA, batch 2",
    "engine (fuse_qkv, channels_last), LoRA switching a/b, batch 2",
    "engine (fuse_qkv, channels_last), batch 2, 1 adapters in the traffic",
    "engine (fuse_qkv, channels_last), batch 2, 2 adapters in the traffic",
    "engine (fuse_qkv, channels_last, fp8=weight), batch 1",
    "engine (fuse_qkv, channels_last, fp8=weight), batch 2",
    "engine (fuse_qkv, channels_last, fp8=weight) + LoRA, batch 2",
    "engine (fuse_qkv, channels_last, fp8=weight), LoRA switching a/b, batch 2",
    "engine (fuse_qkv, channels_last, fp8=weight), batch 2, 1 adapters in the traffic",
    "engine (fuse_qkv, channels_last, fp8=weight), batch 2, 2 adapters in the traffic",
    "engine (grouped by set), batch 2, 1 adapters in the traffic",
    "engine (grouped by set), batch 2, 2 adapters in the traffic",
    "HTTP service, concurrency 1, 2 adapters mixed",
    "HTTP service, concurrency 2, 2 adapters mixed",
    "HTTP service, concurrency 2, 1 adapters mixed",
    "open loop, request, one request alone",
    "open loop, request, saturation (4 at once)",
    "open loop, request, 50% load",
    "open loop, step, one request alone",
    "open loop, step, saturation (4 at once)",
    "open loop, step, 50% load",
    "plain peft loop, r16, batch 2",
    "project train, r16, batch 2",
]


@pytest.mark.slow
def test_bench_runs_on_cpu_with_the_tiny_model(tmp_path):
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "bench.run", "--device", "cpu", "--size", "64"]
    command += ["--steps", "2", "--batch", "2", "--concurrency", "1,2", "--requests", "2"]
    command += ["--repeats", "1", "--train-steps", "1", "--out", str(out)]
    command += ["--mixed-adapters", "1,2", "--open-loop", "0.5", "--open-loop-requests", "2"]
    # The speed options that need no compiler (compiling is tested in test_engine_speed).
    command += ["--speed", "fuse_qkv,channels_last", "--profile", "--fp8", "weight"]
    # About 2 min on 2 cores; the bound only stops a hang (a server that never gets ready).
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    results = json.loads((out / "results.json").read_text())
    assert "errors" not in results
    assert results["model"] == "tiny" and results["device"].startswith("cpu")
    assert [r["name"] for r in results["rows"]] == ROWS
    for row in results["rows"]:
        for key in ("images_per_s", "p50_s", "p95_s", "achieved_tflops", "peak_memory_gb"):
            assert row[key] > 0 and math.isfinite(row[key]), (row["name"], key, row[key])
        assert row["p95_s"] >= row["p50_s"]
        if row["baseline"]:
            assert row["ratio"] > 0
        if "LoRA switching" in row["name"]:  # the engine's own time to change adapters
            assert 0 < row["extra"]["adapter_switch_s_p50"] < 5
    assert results["flops"]["per_image"] > results["flops"]["unet_forward"] > 0

    # The service's images are the eager diffusers images, in process and over HTTP (PNG).
    for path in ("engine", "engine (fuse_qkv, channels_last)", "http"):
        for case in ("plain", "lora"):
            diff = results["correctness"][path][case]
            assert diff["max_abs_diff"] <= 2 and diff["psnr_db"] > 40, (path, case, diff)

    # float8 weights: near the eager images, not equal to them.
    for case in ("plain", "lora"):
        diff = results["correctness"]["engine (fuse_qkv, channels_last, fp8=weight)"][case]
        assert 0 < diff["max_abs_diff"] and diff["psnr_db"] > 30, (case, diff)

    # ...while the adapter itself changes the image far more than that.
    assert results["correctness"]["diffusers"]["lora vs no lora"]["max_abs_diff"] > 5

    # Where the time goes, per engine: the profile's shares add up, its table is written.
    profiles = results["profiles"]
    assert [p["profiled"] for p in profiles] == [
        "engine + LoRA, batch 2",
        "engine (fuse_qkv, channels_last) + LoRA, batch 2",
        "engine (fuse_qkv, channels_last, fp8=weight) + LoRA, batch 2",
    ]
    for profiled in profiles:
        assert abs(sum(profiled["share"].values()) - 1) < 0.01
        assert profiled["share"]["matmul"] > 0 and profiled["top"]
    assert len(list(out.glob("profile-*.txt"))) == 3

    table = (out / "results.md").read_text()
    assert all(name in table for name in ROWS)
    assert table in done.stdout

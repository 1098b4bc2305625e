"""`python -m train selftest`: every check passes on a healthy setup, and each failure names its
fix and makes the exit status non-zero."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from train.cli import main
from train.config import TrainConfig
from train.sample_data import write_sample_dataset
from train.selftest import (
    FAIL,
    GIB,
    MEMORY_FIX,
    PASS,
    SKIP,
    WARN,
    Gpu,
    Probe,
    _image,
    _memory,
    _trial_error,
    check_dataset,
    check_devices,
    check_disk,
    check_libraries,
)

TRIAL = ("disk", "training steps", "GPU memory", "render")
CHECKS = (
    "devices",
    "libraries",
    "dataset: images",
    "dataset: readable",
    "dataset: captions",
    "dataset: sizes",
    "dataset: duplicates",
    "dataset: held out",
    "store",
    *TRIAL,
)


def options(data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--base", "sdxl-tiny", "--data-dir", str(data), "--name", "selftest",
        "--output-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
        "--resolution", "64", "--rank", "2", "--batch-size", "2",
        "--validation-inference-steps", "2", "--validation-split", "0.25", *extra,
    ]  # fmt: skip


def rows(out: str) -> dict[str, tuple[str, str]]:
    """check -> (result, the text after it, fix lines included) from the printed table."""
    found: dict[str, tuple[str, str]] = {}
    last = None
    for line in out.splitlines()[2:]:
        if line.startswith(" ") and last:
            found[last] = (found[last][0], found[last][1] + "\n" + line.strip())
            continue
        for name in CHECKS:
            if line.startswith(name + " "):
                result, _, detail = line[len(name) :].strip().partition(" ")
                found[name], last = (result, detail.strip()), name
    return found


def selftest(capsys, *args: str) -> tuple[int, dict, str, str]:
    code = main(["selftest", *args])
    captured = capsys.readouterr()
    return code, rows(captured.out), captured.out, captured.err


@pytest.mark.slow
def test_a_healthy_setup_passes_every_check(tiny_base, tmp_path, capsys):
    data = write_sample_dataset(tmp_path / "wounds", count=8, size=64)
    code, found, out, _ = selftest(capsys, *options(data, tmp_path))
    assert code == 0, out
    assert list(found) == list(CHECKS)
    for name, (result, _) in found.items():
        assert result in (PASS, WARN, SKIP), (name, out)
    assert "6 to train, 2 held out" in found["dataset: images"][1]
    assert "2 steps of 2 examples at 64², loss" in found["training steps"][1]
    assert "64² in 2 steps" in found["render"][1]
    assert out.rstrip().endswith("selftest: all checks passed")
    assert not (tmp_path / "runs" / "selftest").exists()  # the trial ran in a temporary folder
    assert any((tmp_path / "cache").iterdir())  # and filled the cache the real run reuses


@pytest.mark.slow
def test_missing_held_out_images_fail_but_the_trial_still_runs(tiny_base, tmp_path, capsys):
    data = write_sample_dataset(tmp_path / "wounds", count=8, size=64)
    args = options(data, tmp_path, "--validation-split", "0", "--gate-min-ssim", "0.75")
    code, found, out, _ = selftest(capsys, *args)
    assert code == 1 and found["dataset: held out"][0] == FAIL
    assert found["training steps"][0] == PASS and found["render"][0] == PASS
    assert out.rstrip().endswith("selftest: FAILED (dataset: held out)")


def broken_dataset(tmp_path: Path) -> Path:
    data = write_sample_dataset(tmp_path / "wounds", count=8, size=64)
    truncated = (data / "0001.png").read_bytes()
    (data / "0001.png").write_bytes(truncated[: len(truncated) // 2])
    (data / "0002.txt").unlink()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(data / "small.png")
    (data / "small.txt").write_text("a small photo")
    shutil.copy(data / "0003.png", data / "copy.png")
    (data / "copy.txt").write_text("the same photo, another caption")
    # a copy with other bytes (PNG compressed differently) but the same pixels
    Image.open(data / "0004.png").save(data / "resaved.png", compress_level=0)
    (data / "resaved.txt").write_text("the same pixels")
    return data


def test_each_dataset_problem_fails_with_its_fix(tiny_base, tmp_path, capsys):
    data = broken_dataset(tmp_path)
    code, found, out, _ = selftest(capsys, *options(data, tmp_path, "--gate-max-fid-clip", "40"))
    assert code == 1
    assert found["dataset: readable"][0] == FAIL
    assert "0001.png: does not decode" in found["dataset: readable"][1]
    assert "fix: re-export each" in found["dataset: readable"][1]
    assert found["dataset: captions"][0] == FAIL and "0002.png" in found["dataset: captions"][1]
    assert "fix: write one for each" in found["dataset: captions"][1]
    assert found["dataset: sizes"][0] == FAIL
    assert "small.png (40×30 < 64×64)" in found["dataset: sizes"][1]
    assert "lower resolution (64)" in found["dataset: sizes"][1]
    duplicates = found["dataset: duplicates"]
    assert duplicates[0] == FAIL and "2 groups of identical images" in duplicates[1]
    assert "0003.png = " in duplicates[1] and "copy.png" in duplicates[1]
    assert "0004.png = " in duplicates[1] and "resaved.png" in duplicates[1]
    assert "fix: delete all but one" in duplicates[1]
    # the trial does not run on data that is known to be broken
    for name in TRIAL:
        assert found[name] == (SKIP, found[name][1]) and "not run: fix dataset" in found[name][1]
    assert "selftest: FAILED (dataset: readable, dataset: captions, dataset: sizes" in out


def test_gate_thresholds_without_held_out_images_fail(tiny_base, sample_dir, tmp_path):
    config = TrainConfig(data_dir=str(sample_dir), name="n", resolution=64, gate_min_ssim=0.75)
    _, found = check_dataset(config)
    held = {c.name: c for c in found}["dataset: held out"]
    assert held.status == FAIL and "gate_min_ssim set, but 0 images are held out" in held.detail
    assert "set validation_split" in held.fix


def test_a_missing_base_fails_with_how_to_import_it(tiny_base, sample_dir, tmp_path, capsys):
    args = options(sample_dir, tmp_path, "--base", "sdxl-base")
    code, found, _, _ = selftest(capsys, *args)
    assert code == 1 and found["store"][0] == FAIL
    assert "'sdxl-base' is not in the model store" in found["store"][1]
    assert "fix: import the base: bentolora-models import" in found["store"][1]


def test_bad_options_are_refused_before_any_check(tmp_path, capsys, monkeypatch):
    code, _, _, err = selftest(capsys, "--data-dir", str(tmp_path), "--name", "x", "--rank", "0")
    assert code == 2 and "rank: 0 must be at least 1" in err
    code, _, _, err = selftest(capsys, "--data-dir", str(tmp_path), "--name", "x", "--gpus", "-1")
    assert code == 2 and "--gpus -1: must be 0 or more" in err
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, _, err = selftest(capsys, "--data-dir", str(tmp_path), "--name", "x")
    assert code == 2 and "not under accelerate launch" in err


# --- the machine: devices, libraries, disk, memory, render


class CpuProbe(Probe):
    def __init__(self, gpus=(), versions=None, free=10**15):
        self._gpus, self._versions, self._free = list(gpus), versions or {}, free

    def gpus(self):
        return self._gpus

    def version(self, distribution):
        return self._versions.get(distribution, super().version(distribution))

    def free_disk(self, path):
        return self._free


A4000 = Gpu("NVIDIA RTX A4000", 16 * GIB, 15 * GIB, bf16=True)
T4 = Gpu("Tesla T4", 15 * GIB, 14 * GIB, bf16=False)


def config(**changes) -> TrainConfig:
    return TrainConfig(data_dir="d", name="n", **changes)


def test_device_checks():
    too_few = check_devices(config(), [A4000], wanted=2)
    assert too_few.status == FAIL and "needs 2 GPUs, 1 visible" in too_few.detail
    assert "raise gradient_accumulation_steps" in too_few.fix
    fp16 = check_devices(config(mixed_precision="fp16"), [], wanted=None)
    assert fp16.status == FAIL and "set mixed_precision: no" in fp16.fix
    bf16 = check_devices(config(mixed_precision="bf16"), [T4], wanted=None)
    assert bf16.status == FAIL and "fp16-fix VAE" in bf16.fix
    assert check_devices(config(), [], wanted=None).status == WARN
    ok = check_devices(config(mixed_precision="bf16"), [A4000, A4000], wanted=2)
    assert ok.status == PASS and "2 × GPU" in ok.detail and "16.0 GiB" in ok.detail


def test_a_library_out_of_range_fails_with_make_install():
    check = check_libraries(config(), CpuProbe(versions={"diffusers": "0.30.0"}))
    assert check.status == FAIL and "diffusers 0.30.0 is not >=0.42" in check.detail
    assert "make install" in check.fix
    assert check_libraries(config(), CpuProbe()).status == PASS
    missing = check_libraries(config(optimizer="adamw8bit"), CpuProbe(versions={}))
    if Probe().version("bitsandbytes") is None:  # the extra the recipe asks for
        assert missing.status == FAIL and "bitsandbytes is not installed" in missing.detail


def test_too_little_disk_fails_with_where_to_free_it(tmp_path):
    run = SimpleNamespace(params=[torch.zeros(10**6)], scan=SimpleNamespace(examples=[0] * 50))
    conf = config(output_dir=str(tmp_path), checkpoint_every=100, keep_checkpoints=3)
    check = check_disk(conf, run, CpuProbe(free=10 * 2**20))
    assert check.status == FAIL and "4 checkpoints" not in check.detail
    assert "3 checkpoints of 11.4 MiB" in check.detail and "too little" in check.detail
    assert "point output_dir / cache_dir at a larger disk" in check.fix
    assert check_disk(conf, run, CpuProbe()).status == PASS


def test_peak_memory_near_the_gpus_size_fails_with_the_memory_fix():
    assert _memory([A4000], 15 * GIB).status == FAIL
    assert _memory([A4000], 15 * GIB).fix == MEMORY_FIX
    assert _memory([A4000], 8 * GIB).status == PASS
    assert _memory([], 0).status == SKIP
    oom = _trial_error("training steps", torch.OutOfMemoryError("CUDA out of memory"), config())
    assert oom.status == FAIL and oom.fix == MEMORY_FIX and "batch_size 1" in oom.detail


def test_a_blank_render_fails_with_the_fp16_vae_fix(tmp_path):
    black = tmp_path / "black.png"
    Image.new("RGB", (64, 64)).save(black)
    check = _image(black, config(resolution=64), 1.0)
    assert check.status == FAIL and "madebyollin/sdxl-vae-fp16-fix" in check.fix
    noise = tmp_path / "noise.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noise)
    assert _image(noise, config(resolution=64), 1.0).status == PASS


def test_ranges_come_from_pyproject_when_bentolora_is_not_installed(monkeypatch):
    import importlib.metadata

    from packaging.requirements import Requirement

    def normal(lines):
        return sorted(str(Requirement(line)) for line in lines)

    installed = normal(Probe().requirements())

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "requires", not_installed)
    assert normal(Probe().requirements()) == installed  # the checkout's pyproject.toml

"""`python -m train evaluate` on an adapter's held-out images by default, and the recipe's gate
thresholds on top of the "better than production" rule."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from models.adapter import save_adapter
from models.clip import build_tiny_clip, save_clip
from models.stages import PRODUCTION, STAGE_LABEL
from models.store import get_entry, list_entries
from tests.store_helpers import one_layer, tiny_info
from train.cli import main
from train.data import scan_dataset
from train.sample_data import write_sample_dataset

METRICS = ("clip_score", "ssim", "lpips_clip", "fid_clip", "kid_clip")


@pytest.fixture(scope="module")
def held_dir(tiny_base, tmp_path_factory):
    save_clip(*build_tiny_clip(0), "clip-tiny", source="tiny:seed=0", reuse_identical=True)
    return write_sample_dataset(tmp_path_factory.mktemp("held") / "wounds", count=3, seed=7)


def adapter_with(name: str, held_dir, **gates):
    """A stored adapter whose metadata lists `held_dir`'s images as held out, and whose
    training config sets `gates`."""
    base = get_entry("sdxl-tiny")
    scan = scan_dataset(held_dir)
    info = replace(
        tiny_info(base),
        training_config={"resolution": 64, "validation_inference_steps": 2, **gates},
        dataset={"examples": 10, "held_out": {**scan.summary(), **scan.listing()}},
    )
    return save_adapter(name, one_layer(base, 0.3), info)


def evaluate(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["evaluate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_held_out_images_are_the_default_prompts_and_reference(held_dir, tmp_path, capsys):
    adapter = adapter_with("held-default", held_dir)
    code, out, err = evaluate(capsys, "--adapter", adapter.tag, "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert f"held-out images of {adapter.tag}: {held_dir.resolve()}" in out
    assert "3 prompts × 1 seeds, 64px, 2 steps" in out
    for metric in METRICS:
        assert any(line.startswith(metric + " ") for line in out.splitlines()), metric
    record = json.loads((tmp_path / "o" / "results.json").read_text())
    assert record["metrics"] == list(METRICS)
    assert (
        record["prompts_file"]
        == record["reference_dir"]
        == f"held-out images of {held_dir.resolve()}"
    )
    assert record["results"]["adapter"]["paired_images"] == 3 and record["prompts"] == 3
    assert record["reference_images"] == 3


def test_promotion_needs_every_recipe_threshold(held_dir, tmp_path, capsys):
    loose = {"gate_max_fid_clip": 1e9, "gate_max_lpips_clip": 1e9}
    adapter = adapter_with("held-gate", held_dir, **loose, gate_min_ssim=0.999999)
    common = ("--adapter", adapter.tag, "--promote", "--margin=-1e9")
    code, out, _ = evaluate(capsys, *common, "--out", str(tmp_path / "a"))
    assert code == 0 and f"gate: NOT PROMOTED {adapter.tag}" in out
    assert "improvement" in out  # the production rule alone would have promoted it
    assert "ssim" in out and "MISSES the threshold > 0.999999" in out
    assert "fid_clip" in out and "meets the threshold < 1e+09" in out
    assert STAGE_LABEL not in get_entry(adapter.tag).labels
    gate = get_entry(adapter.tag).metadata["evaluation"]["gate"]
    assert gate["promote"] is False and gate["limits"]["ssim"] == "> 0.999999"
    assert any("MISSES" in line for line in gate["thresholds"])

    # the same adapter, the SSIM threshold dropped on the command line: promoted
    code, out, _ = evaluate(capsys, *common, "--gate-min-ssim", "0", "--out", str(tmp_path / "b"))
    assert code == 0 and f"gate: PROMOTED {adapter.tag}" in out
    assert "MISSES" not in out
    assert get_entry(adapter.tag).labels[STAGE_LABEL] == PRODUCTION


def test_a_changed_held_out_image_is_refused(held_dir, tmp_path, capsys):
    copy = shutil.copytree(held_dir, tmp_path / "copy")
    adapter = adapter_with("held-changed", copy)
    (copy / "0001.png").write_bytes((copy / "0002.png").read_bytes())
    before = {e.tag: e.metadata for e in list_entries()}
    code, _, err = evaluate(capsys, "--adapter", adapter.tag, "--out", str(tmp_path / "o"))
    assert code == 1 and "Traceback" not in err
    assert f"held-out image {copy / '0001.png'} changed since {adapter.tag} was trained" in err
    assert "pass --prompts and --reference" in err
    (copy / "0001.png").unlink()
    code, _, err = evaluate(capsys, "--adapter", adapter.tag, "--out", str(tmp_path / "o"))
    assert code == 1 and "0001.png is missing" in err
    assert {e.tag: e.metadata for e in list_entries()} == before
    assert not (tmp_path / "o").exists()


def test_without_held_out_images_prompts_are_required(held_dir, tmp_path, capsys):
    base = get_entry("sdxl-tiny")
    plain = save_adapter("held-none", one_layer(base), tiny_info(base))
    code, _, err = evaluate(capsys, "--adapter", plain.tag)
    assert code == 1
    assert f"--prompts is required: {plain.tag} was trained without held-out images" in err

    prompts = tmp_path / "p.txt"
    prompts.write_text("a wound\n")
    info = replace(tiny_info(base), training_config={"gate_max_fid_clip": 40.0})
    gated = save_adapter("held-none-gated", one_layer(base), info)
    code, _, err = evaluate(capsys, "--adapter", gated.tag, "--prompts", str(prompts), "--promote")
    assert code == 1
    assert "the gate threshold on fid_clip needs reference images" in err

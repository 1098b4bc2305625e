"""`python -m train evaluate`: metrics recorded in the store, the quality gate, clear refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import bentoml
import numpy as np
import pytest
from PIL import Image
from quality_helpers import save_clip_folder, torchmetrics_clip_scores

from models.clip import build_tiny_clip, save_clip
from models.stages import ARCHIVED, PRODUCTION, STAGE_LABEL
from models.store import get_entry, list_entries
from tests.store_helpers import one_layer_adapter
from train.cli import main

ROOT = Path(__file__).parent.parent
METRICS = ("clip_score", "ssim", "lpips_clip", "fid_clip", "kid_clip")


@pytest.fixture(scope="module")
def inputs(tiny_base, sample_dir, tmp_path_factory):
    """clip-tiny in the store, a .jsonl with two reference images and one without, a .txt."""
    save_clip(*build_tiny_clip(0), "clip-tiny", source="tiny:seed=0", reuse_identical=True)
    folder = tmp_path_factory.mktemp("prompts")
    rows = [
        {"prompt": (sample_dir / f"000{i}.txt").read_text().strip(), "image": f"ref/000{i}.png"}
        for i in range(2)
    ]
    rows.append({"prompt": "a green square on a white background"})
    (folder / "ref").mkdir()
    for i in range(2):
        (folder / "ref" / f"000{i}.png").write_bytes((sample_dir / f"000{i}.png").read_bytes())
    jsonl = folder / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    txt = folder / "prompts.txt"
    txt.write_text("# two prompts\na red circle\n\na blue square on a yellow background\n")
    return {"jsonl": jsonl, "txt": txt, "rows": rows, "reference": sample_dir}


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train", "evaluate", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        cwd=ROOT,
        timeout=600,
    )


def table_row(stdout: str, metric: str) -> list[str]:
    return next(line.split() for line in stdout.splitlines() if line.startswith(metric + " "))


def test_evaluate_end_to_end(inputs, tmp_path):
    adapter = one_layer_adapter("eval-e2e", get_entry("sdxl-tiny"), 0.3)
    out = tmp_path / "out"
    result = evaluate(
        "--adapter", "lora-eval-e2e", "--prompts", str(inputs["jsonl"]),
        "--reference", str(inputs["reference"]), "--steps", "2", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "metric" in result.stdout and "better than base?" in result.stdout
    for metric in METRICS:  # name, (direction), base, adapter, yes/no
        assert len(table_row(result.stdout, metric)) == 5
    assert "gate:" not in result.stdout

    record = json.loads((out / "results.json").read_text())
    assert record["adapter"] == adapter.tag and record["metrics"] == list(METRICS)
    assert record["seeds"] == [1234, 1235, 1236] and record["size"] == 64
    stored = bentoml.models.get(adapter.tag).info
    assert STAGE_LABEL not in stored.labels
    evaluation = stored.metadata["evaluation"]
    assert evaluation["prompts_sha256"] and evaluation["steps"] == 2
    assert evaluation["clip"].startswith("clip-tiny:")
    for label in ("base", "adapter"):
        for metric in METRICS:
            assert evaluation["results"][label][metric] == pytest.approx(
                record["results"][label][metric]
            )
        assert evaluation["results"][label]["paired_images"] == 2

    # The CLIP scores it printed and recorded, recomputed by torchmetrics from the written images.
    clip_dir = save_clip_folder(*build_tiny_clip(0), tmp_path / "clip")
    prompts = [row["prompt"] for row in inputs["rows"]]
    for column, label in ((2, "base"), (3, "adapter")):
        images = [Image.open(out / label / f"{i:03d}-00.png") for i in range(3)]
        scores = torchmetrics_clip_scores(clip_dir, images, prompts)
        assert record["results"][label]["clip_score_per_image"] == pytest.approx(scores, abs=1e-4)
        mean = sum(scores) / len(scores)
        shown_mean, shown_std = table_row(result.stdout, "clip_score")[column].split("±")
        assert float(shown_mean) == pytest.approx(mean, abs=1e-4)
        assert float(shown_std) == pytest.approx(np.std(scores), abs=1e-4)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["evaluate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_promotion_gate(inputs, tmp_path, capsys):
    base = get_entry("sdxl-tiny")
    first = one_layer_adapter("eval-gate", base, 0.3)
    common = ("--prompts", str(inputs["txt"]), "--steps", "2", "--promote")

    code, out, _ = run_main(capsys, "--adapter", first.tag, *common, "--margin", "1e9",
                            "--out", str(tmp_path / "a"))  # fmt: skip
    assert code == 0 and f"gate: NOT PROMOTED {first.tag}" in out
    assert "is not more than margin 1e+09" in out
    assert STAGE_LABEL not in get_entry(first.tag).labels
    assert get_entry(first.tag).metadata["evaluation"]["gate"]["promote"] is False

    code, out, _ = run_main(capsys, "--adapter", first.tag, *common, "--margin=-1e9",
                            "--out", str(tmp_path / "b"))  # fmt: skip
    assert code == 0 and f"gate: PROMOTED {first.tag} to stage=production (archived: none)" in out
    assert get_entry(first.tag).labels[STAGE_LABEL] == PRODUCTION

    second = one_layer_adapter("eval-gate", base, 0.5)
    code, out, _ = run_main(capsys, "--adapter", "eval-gate", *common, "--margin=-1e9",
                            "--metric", "clip_score", "--out", str(tmp_path / "c"))  # fmt: skip
    assert code == 0, out
    assert f"against production {first.tag}" in out and "better than production?" in out
    assert len(table_row(out, "clip_score")) == 6  # base, adapter and production columns
    assert f"archived: {first.tag}" in out and f"for production {first.tag}" in out
    assert get_entry(first.tag).labels[STAGE_LABEL] == ARCHIVED
    assert get_entry(second.tag).labels[STAGE_LABEL] == PRODUCTION
    record = json.loads((tmp_path / "c" / "results.json").read_text())
    assert record["production"] == first.tag and record["reference_variant"] == "production"
    # Same seeds every run: the base renders identically each time.
    for name in ("000-00.png", "001-00.png"):
        runs = [(tmp_path / run / "base" / name).read_bytes() for run in ("a", "b", "c")]
        assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing prompts", "prompts file /no/such/prompts.txt: no such file"),
        ("empty prompts", "holds no prompts"),
        ("bad image", "not a readable image"),
        ("fid without reference", "--metric fid_clip needs --reference DIR"),
        ("ssim without reference images", "--metric ssim needs reference images in the prompts"),
        ("unknown adapter", "'lora-no-such-adapter' is not in the model store"),
    ],
)
def test_bad_inputs_are_refused_before_anything_is_written(case, message, inputs, tmp_path, capsys):
    adapter = one_layer_adapter("eval-refused", get_entry("sdxl-tiny"))
    prompts, extra = str(inputs["txt"]), []
    if case == "missing prompts":
        prompts = "/no/such/prompts.txt"
    elif case == "empty prompts":
        (tmp_path / "empty.txt").write_text("# nothing\n\n")
        prompts = str(tmp_path / "empty.txt")
    elif case == "bad image":
        (tmp_path / "broken.png").write_bytes(b"not a png")
        (tmp_path / "p.jsonl").write_text('{"prompt": "x", "image": "broken.png"}\n')
        prompts = str(tmp_path / "p.jsonl")
    elif case == "fid without reference":
        extra = ["--metric", "fid_clip"]
    elif case == "ssim without reference images":
        extra = ["--metric", "ssim", "--reference", str(inputs["reference"])]
    name = "no-such-adapter" if case == "unknown adapter" else adapter.tag
    store_before = {e.tag: (e.labels, e.metadata) for e in list_entries()}

    code, out, err = run_main(capsys, "--adapter", name, "--prompts", prompts,
                              "--out", str(tmp_path / "out"), *extra)  # fmt: skip
    assert code != 0
    assert message in err and err.startswith("error: ") and "Traceback" not in err
    assert {e.tag: (e.labels, e.metadata) for e in list_entries()} == store_before
    assert not (tmp_path / "out").exists()

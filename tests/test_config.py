"""Training configuration: YAML recipes, command-line overrides, every bad value reported at once."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from train.cli import build_parser, config_from_args
from train.config import RUNTIME_ONLY, ConfigError, TrainConfig, from_dict, load_yaml

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_recipe_is_a_valid_config(recipe):
    config = from_dict(load_yaml(CONFIGS / recipe))
    assert config.name and config.data_dir


def test_medical_recipe_matches_the_brief():
    c = from_dict(load_yaml(CONFIGS / "medical-128.yaml"))
    assert (c.resolution, c.batch_size, c.gradient_accumulation_steps, c.epochs) == (128, 4, 4, 100)
    assert (c.rank, c.alpha, c.dropout) == (8, 16.0, 0.1)
    assert c.target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    assert (c.optimizer, c.learning_rate, c.lr_scheduler, c.max_grad_norm) == (
        "adamw",
        1e-4,
        "cosine",
        1.0,
    )
    # effective batch 32 on 2 GPUs
    assert c.batch_size * c.gradient_accumulation_steps * 2 == 32


def test_command_line_overrides_yaml():
    config = config_from_args(
        [
            "--config",
            str(CONFIGS / "quickstart.yaml"),
            "--rank",
            "8",
            "--target-modules",
            "to_q,to_v",
            "--no-cache-latents",
            "--crop",
            "random",
            "--learning-rate",
            "3e-4",
        ]
    )
    assert config.rank == 8 and config.target_modules == ("to_q", "to_v")
    assert config.cache_latents is False and config.crop == "random"
    assert config.learning_rate == 3e-4
    assert config.base == "sdxl-tiny"  # from the YAML


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        TrainConfig(
            data_dir="d",
            name="n",
            resolution=100,
            rank=0,
            dropout=1.5,
            crop="diagonal",
            mixed_precision="fp8",
        )
    message = str(err.value)
    for key in (
        "resolution: 100",
        "rank: 0",
        "dropout: 1.5",
        "crop: 'diagonal'",
        "mixed_precision: 'fp8'",
    ):
        assert key in message


def test_wrong_types_name_the_field():
    with pytest.raises(ConfigError, match="rank: 'eight' is not an integer"):
        from_dict({"data_dir": "d", "name": "n", "rank": "eight"})
    with pytest.raises(ConfigError, match="flip: 'yes please' is not true or false"):
        from_dict({"data_dir": "d", "name": "n", "flip": "yes please"})


def test_unknown_key_is_refused_with_a_suggestion(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("data_dir: d\nname: n\nlearning_rte: 0.1\n")
    with pytest.raises(
        ConfigError, match="unknown key.*'learning_rte'.*did you mean 'learning_rate'"
    ):
        from_dict(load_yaml(path), source=str(path))


def test_conflicting_options_are_explained():
    with pytest.raises(ConfigError, match="crop: random needs cache_latents: false"):
        TrainConfig(data_dir="d", name="n", crop="random")
    with pytest.raises(ConfigError, match="text_encoder_lora: needs cache_text_embeddings: false"):
        TrainConfig(data_dir="d", name="n", text_encoder_lora=True)
    with pytest.raises(ConfigError, match="keep_checkpoints: 1 must be at least 2"):
        TrainConfig(data_dir="d", name="n", checkpoint_every=10, keep_checkpoints=1)


def test_config_is_never_mutated_and_derives_values():
    config = TrainConfig(
        data_dir="d",
        name="n",
        rank=4,
        alpha=8,
        batch_size=2,
        gradient_accumulation_steps=2,
        epochs=3,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 8  # type: ignore[misc]
    assert config.total_steps(examples=10, world_size=1) == 9  # ceil(10 / 4) * 3
    assert config.total_steps(examples=10, world_size=2) == 6
    assert dataclasses.replace(config, max_steps=5).total_steps(10) == 5
    resumed = dataclasses.replace(config, resume="latest")
    assert config.fingerprint(exclude=("resume",)) == resumed.fingerprint(exclude=("resume",))


def test_help_lists_every_option_with_its_doc():
    text = build_parser().format_help()
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "Min-SNR" in text and "LoRA rank r" in text


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--data-dir",
            str(tmp_path),
            "--name",
            "x",
            "--resolution",
            "30",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "resolution: 30 must be a positive multiple of 8" in result.stderr
    assert "Traceback" not in result.stderr


# --- the small-dataset recipes


def test_phase_recipes_are_the_template_on_one_gpu_each():
    template = from_dict(load_yaml(CONFIGS / "medical-128.yaml"))
    assert template.global_batch(2) == 32
    for phase, data in (("i", "data/wounds/phase-I"), ("r", "data/wounds/phase-R")):
        c = from_dict(load_yaml(CONFIGS / f"medical-128-phase-{phase}.yaml"))
        assert (c.name, c.data_dir) == (f"wounds-phase-{phase}", data)
        assert c.global_batch(1) == 32  # one GPU per phase: 4 × 8
        assert (c.rank, c.alpha, c.resolution, c.epochs, c.lr_scheduler, c.learning_rate) == (
            8, 16.0, 128, 100, "cosine", 1e-4,
        )  # fmt: skip
        assert c.validation_split == 0.1
        assert (c.gate_max_fid_clip, c.gate_min_ssim, c.gate_max_lpips_clip) == (40, 0.75, 0.25)
        same = dataclasses.replace(
            c,
            name=template.name,
            data_dir=template.data_dir,
            gradient_accumulation_steps=4,
            validation_prompts=template.validation_prompts,
        )
        assert same == template  # nothing else differs from the template


def test_quick_recipe_is_the_template_for_a_hundred_steps():
    c = from_dict(load_yaml(CONFIGS / "medical-128-quick.yaml"))
    assert (c.resolution, c.rank, c.max_steps, c.global_batch(1)) == (128, 8, 100, 4)
    assert c.validation_split == 0.1 and c.gate_min_ssim == 0.75


def test_a_recipe_extends_another_and_overrides_key_by_key(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "parent.yaml").write_text("data_dir: d\nname: parent\nrank: 8\n")
    (tmp_path / "child.yaml").write_text("extends: base/parent.yaml\nname: child\n")
    (tmp_path / "grandchild.yaml").write_text("extends: child.yaml\nalpha: 2\n")
    assert load_yaml(tmp_path / "grandchild.yaml") == {
        "data_dir": "d", "name": "child", "rank": 8, "alpha": 2,
    }  # fmt: skip
    config = config_from_args(["--config", str(tmp_path / "child.yaml"), "--rank", "4"])
    assert (config.name, config.rank) == ("child", 4)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "extends: missing.yaml\n",
            "extends missing.yaml: config file .*missing.yaml does not exist",
        ),
        ("extends: loop.yaml\n", "extends loop.yaml makes a loop of recipes"),
        ("extends: [a, b]\n", r"extends: \['a', 'b'\] must name a recipe file"),
    ],
)
def test_bad_extends_are_refused(tmp_path, text, message):
    (tmp_path / "loop.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_yaml(tmp_path / "loop.yaml")


def test_held_out_and_gate_fields_are_checked_and_do_not_break_old_checkpoints():
    with pytest.raises(ConfigError) as err:
        TrainConfig(data_dir="d", name="n", gate_min_ssim=1.5, gate_max_fid_clip=-1)
    assert "gate_min_ssim: 1.5 must be in [0, 1)" in str(err.value)
    assert "gate_max_fid_clip: -1 must be 0 (no threshold) or more" in str(err.value)
    plain = TrainConfig(data_dir="d", name="n")
    # What a checkpoint written before these fields existed holds: the hash of the other
    # fields. Fields added later count only when set, so such a checkpoint still resumes.
    before = {
        k: v
        for k, v in plain.to_dict().items()
        if k not in RUNTIME_ONLY
        and k not in ("validation_split", "validation_dir")
        and not k.startswith("gate_")
    }
    digest = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert plain.fingerprint(exclude=RUNTIME_ONLY) == digest
    split = dataclasses.replace(plain, validation_split=0.1)
    assert split.fingerprint(exclude=RUNTIME_ONLY) != digest
    gated = dataclasses.replace(plain, gate_min_ssim=0.75)  # read by evaluate, not training
    assert gated.fingerprint(exclude=RUNTIME_ONLY) == digest

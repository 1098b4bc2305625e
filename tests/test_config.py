"""Training configuration: YAML recipes, command-line overrides, every bad value reported at once."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from train.cli import build_parser, config_from_args
from train.config import ConfigError, TrainConfig, from_dict, load_yaml

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

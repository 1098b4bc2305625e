"""Service settings from the environment: typed, checked at start, with the variable named."""

from __future__ import annotations

import pytest
import torch

from service.settings import Settings


def test_defaults_serve_the_tiny_models_on_the_cpu():
    settings = Settings.from_env({})
    assert (settings.base, settings.clip) == ("sdxl-tiny", "clip-tiny")
    if not torch.cuda.is_available():
        assert settings.torch_device() == "cpu" and settings.torch_dtype() == torch.float32


def test_environment_overrides():
    settings = Settings.from_env(
        {
            "BENTOLORA_BASE": "sdxl-base",
            "BENTOLORA_DTYPE": "bfloat16",
            "BENTOLORA_MAX_BATCH_IMAGES": "4",
            "BENTOLORA_DEVICE": "cuda:1",
        }
    )
    assert settings.base == "sdxl-base" and settings.max_batch_images == 4
    assert settings.torch_dtype() == torch.bfloat16 and settings.torch_device() == "cuda:1"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BENTOLORA_DTYPE": "fp8"}, "BENTOLORA_DTYPE='fp8' is not one of"),
        ({"BENTOLORA_DEVICE": "tpu"}, "BENTOLORA_DEVICE='tpu' is not auto, cpu, cuda"),
        ({"BENTOLORA_MAX_PIXELS": "lots"}, "BENTOLORA_MAX_PIXELS='lots' is not an integer"),
        ({"BENTOLORA_MAX_BATCH_IMAGES": "0"}, "BENTOLORA_MAX_BATCH_IMAGES=0 must be at least 1"),
    ],
)
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)

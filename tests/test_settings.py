"""Service settings from the environment: typed, checked at start, with the variable named."""

from __future__ import annotations

import re
from dataclasses import fields

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


def test_docs_settings_table_is_the_code():
    """docs/settings.md's table is what tools/settings_doc.py makes from Settings (regenerate it
    with `python tools/settings_doc.py`), so every variable is documented with its default."""
    from tools import settings_doc

    text = settings_doc.DOC.read_text()
    assert settings_doc.render(text) == text
    for f in fields(Settings):
        assert f"`BENTOLORA_{f.name.upper()}`" in text


def test_every_bentolora_variable_in_the_repository_is_documented():
    """A variable read anywhere (code, scripts, recipes) has a row in docs/settings.md."""
    from tools import settings_doc

    root = settings_doc.ROOT
    documented = set(re.findall(r"`(BENTOLORA_[A-Z0-9_]+)`", settings_doc.DOC.read_text()))
    found = set()
    for pattern in ("**/*.py", "**/*.sh", "**/*.yaml", "Makefile"):
        for path in root.glob(pattern):
            if ".venv" not in path.parts and "docs" not in path.parts:
                found |= set(re.findall(r"BENTOLORA_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    assert found - documented == set()


def test_a_setting_without_its_documentation_is_refused(monkeypatch):
    from tools import settings_doc

    monkeypatch.setattr(settings_doc, "field_docs", lambda: {"base": "the base"})
    with pytest.raises(ValueError, match="must start with 'BENTOLORA_BASE:'"):
        settings_doc.table()

"""Shared fixtures: an isolated model store holding the tiny base, and the sample dataset.

The store lives in a temporary BENTOML_HOME set before BentoML is imported, so tests never touch
the user's store, and subprocesses (CLI, accelerate launch) inherit the same one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_HOME = Path(tempfile.mkdtemp(prefix="bentolora-tests-"))
os.environ["BENTOML_HOME"] = str(_HOME / "bentoml")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["BENTOML_DO_NOT_TRACK"] = "True"
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base():
    """The tiny SDXL base saved in the test store as `sdxl-tiny`."""
    from models.bases import save_base
    from models.tiny import build_tiny_pipeline

    return save_base(
        build_tiny_pipeline(0), "sdxl-tiny", source="tiny:seed=0", reuse_identical=True
    )


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """Eight generated 64×64 images with .txt captions."""
    from train.sample_data import write_sample_dataset

    return write_sample_dataset(tmp_path_factory.mktemp("sample") / "data", count=8, size=64)


@pytest.fixture(scope="session")
def store_home() -> Path:
    return Path(os.environ["BENTOML_HOME"])

"""Updating a stored version's metadata and labels in place, and promotion between stages."""

from __future__ import annotations

import errno
import os

import pytest

from models.hashing import hash_folder
from models.stages import ARCHIVED, PRODUCTION, STAGE_LABEL, production_versions, promote
from models.store import StoreError, get_entry, store_root, update_entry
from tests.store_helpers import bentoml_models, one_layer_adapter


def test_update_entry_merges_metadata_and_labels_and_bentoml_reads_it(tiny_base):
    entry = one_layer_adapter("update-me", tiny_base)
    before = set(entry.path.iterdir())
    updated = update_entry(
        entry.tag, metadata={"evaluation": {"clip_score": 21.5, "seeds": [1, 2]}}, labels={"a": "b"}
    )
    assert updated.metadata["evaluation"] == {"clip_score": 21.5, "seeds": [1, 2]}
    assert updated.metadata["rank"] == entry.metadata["rank"]  # other keys kept
    assert updated.labels == {**entry.labels, "a": "b"}
    shown = bentoml_models("get", entry.tag)
    assert shown["metadata"]["evaluation"]["clip_score"] == 21.5
    assert shown["labels"]["a"] == "b"
    # Weights untouched, no stray file: the content hash still matches (adapters stay servable).
    assert set(entry.path.iterdir()) == before
    assert hash_folder(entry.path) == entry.metadata["content_hash"]
    removed = update_entry(entry.tag, labels={"a": None})
    assert "a" not in removed.labels and removed.metadata["evaluation"]["clip_score"] == 21.5


def test_update_entry_of_a_missing_tag_names_it(tiny_base):
    with pytest.raises(StoreError, match="lora-nothing-here.*not in the model store"):
        update_entry("lora-nothing-here:v1", labels={"x": "y"})


def test_a_failed_update_leaves_the_old_file_and_no_temporary(tiny_base, monkeypatch):
    entry = one_layer_adapter("update-fails", tiny_base)
    yaml_before = (entry.path / "model.yaml").read_text()

    def full_disk(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("models.store.os.replace", full_disk)
    with pytest.raises(StoreError, match="no space left.*unchanged"):
        update_entry(entry.tag, labels={"stage": "production"})
    assert (entry.path / "model.yaml").read_text() == yaml_before
    staging = store_root().parent / ".bentolora-staging"
    assert not list(staging.glob("lora-update-fails-*"))


def test_promotion_archives_the_previous_production_version(tiny_base):
    first = one_layer_adapter("staged", tiny_base, 0.01)
    second = one_layer_adapter("staged", tiny_base, 0.02)
    assert production_versions("lora-staged") == []
    assert promote(first) == []
    assert [e.tag for e in production_versions("lora-staged")] == [first.tag]
    assert promote(second) == [first.tag]
    assert get_entry(first.tag).labels[STAGE_LABEL] == ARCHIVED
    assert get_entry(second.tag).labels[STAGE_LABEL] == PRODUCTION
    assert [e.tag for e in production_versions("lora-staged")] == [second.tag]
    assert promote(second) == []  # promoting the production version again changes nothing


def test_update_entry_stores_numpy_numbers_and_tuples_as_plain_values(tiny_base):
    import numpy as np

    entry = one_layer_adapter("update-numpy", tiny_base)
    scores = {"clip_score": np.float32(21.5), "seeds": (1, 2), "per_prompt": np.array([1.0, 2.0])}
    updated = update_entry(entry.tag, metadata={"evaluation": scores})
    assert updated.metadata["evaluation"] == {
        "clip_score": 21.5,
        "seeds": [1, 2],
        "per_prompt": [1.0, 2.0],
    }
    assert bentoml_models("get", entry.tag)["metadata"]["evaluation"]["seeds"] == [1, 2]
    with pytest.raises(StoreError, match="labels are text"):
        update_entry(entry.tag, labels={"stage": 3})

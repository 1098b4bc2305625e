"""The model store contract: bases and adapters as BentoML models, atomic writes, clear lookups."""

from __future__ import annotations

import pytest

from models.adapter import get_adapter, list_adapters, save_adapter
from models.bases import get_base
from models.hashing import hash_folder
from models.store import StoreError, create_entry, get_entry, list_entries, store_root
from tests.store_helpers import bentoml_models, one_layer, tiny_info


def test_base_entry_has_the_contracted_metadata(tiny_base):
    meta = tiny_base.metadata
    assert meta["source"] == "tiny:seed=0"
    assert meta["dtype"] == "float32"
    assert meta["content_hash"] == hash_folder(tiny_base.path)
    assert set(meta["parameters"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert (tiny_base.path / "model_index.json").is_file()
    assert get_base("sdxl-tiny").tag == tiny_base.tag


def test_bentoml_cli_lists_base_and_adapter(tiny_base):
    entry = save_adapter("cli-check", one_layer(tiny_base), tiny_info(tiny_base))
    tags = {m["tag"] for m in bentoml_models("list")}
    assert tiny_base.tag in tags and entry.tag in tags
    assert entry.name == "lora-cli-check"
    assert entry.labels == {"bentolora.kind": "adapter", "bentolora.base": "sdxl-tiny"}
    assert entry.metadata["base_hash"] == tiny_base.metadata["content_hash"]
    assert entry.metadata["rank"] == 2 and entry.metadata["target_modules"] == ["to_q"]


def test_resolve_adapter_by_name_prefix_and_version(tiny_base):
    first = save_adapter("versions", one_layer(tiny_base, 0.01), tiny_info(tiny_base))
    second = save_adapter("lora-versions", one_layer(tiny_base, 0.02), tiny_info(tiny_base))
    assert get_adapter("versions").tag == second.tag  # latest
    assert get_adapter("lora-versions").tag == second.tag
    assert get_adapter(first.tag).tag == first.tag
    assert get_adapter("versions:" + first.version).tag == first.tag
    tags = [e.tag for e in list_adapters(base="sdxl-tiny")]
    assert first.tag in tags and second.tag in tags
    assert list_adapters(base="some-other-base") == []


def test_unknown_tags_name_what_is_there(tiny_base):
    with pytest.raises(StoreError, match="'nope' is not in the model store.*sdxl-tiny"):
        get_base("nope")
    with pytest.raises(StoreError, match="is a base, not a adapter"):
        get_entry("sdxl-tiny", kind="adapter")


def test_failed_write_leaves_nothing(tiny_base):
    before = {e.tag for e in list_entries()}
    with pytest.raises(RuntimeError):
        with create_entry("lora-broken", kind="adapter") as staged:
            (staged.path / "half.bin").write_bytes(b"x" * 100)
            raise RuntimeError("disk on fire")
    assert {e.tag for e in list_entries()} == before
    assert not (store_root() / "lora-broken").exists()
    assert not any((store_root().parent / ".bentolora-staging").iterdir())


def test_non_finite_adapter_is_never_stored(tiny_base):
    layers = one_layer(tiny_base)
    next(iter(layers["unet"].values()))[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        save_adapter("nan-weights", layers, tiny_info(tiny_base))
    assert not (store_root() / "lora-nan-weights").exists()


@pytest.mark.parametrize("bad", ["../escape", "Upper", "a/b", "", "x" * 80])
def test_names_with_paths_or_odd_characters_are_refused(tiny_base, bad):
    with pytest.raises(StoreError, match="is not allowed"):
        save_adapter(bad, one_layer(tiny_base), tiny_info(tiny_base))

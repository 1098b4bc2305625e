"""The store watcher without a server (service.store_watcher, service.adapter_policy): what counts
as a change of the store, one look re-selecting only after one, errors that leave the served set
alone, the deny list (persisted in the store's home) and unloads applied on every re-selection.
The engine is a stand-in that publishes what it is handed; the selection is the real one."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import replace

import pydantic
import pytest
import torch

from models.adapter import save_adapter
from models.clip import build_tiny_clip, save_clip
from models.store import store_root, update_entry
from service.adapter_policy import DENIED, AdapterPolicy, DenyListError
from service.adapter_selection import StoreAdapters
from service.engine import Engine
from service.schemas import bind_requests
from service.settings import Settings
from service.state import ServedSnapshot, ServerState
from service.store_watcher import StoreWatcher, store_signature
from tests.store_helpers import LAYER, one_layer_adapter, tiny_info


class StandInEngine:
    """What the watcher needs of service.engine.Engine: the base, the state, `serve_adapters`."""

    def __init__(self, base):
        self.base = base
        self.state = ServerState(Settings())
        self.state.publish(ServedSnapshot(loaded=True, base_tag=base.tag))
        self.published: list[StoreAdapters] = []
        self.forgotten: list[str] = []

    def serve_adapters(self, found: StoreAdapters, forget=()) -> ServedSnapshot:
        self.published.append(found)
        self.forgotten.extend(forget)
        snapshot = replace(
            self.state.snapshot,
            adapters=found.served,
            refused_adapters=found.refused,
            foreign_adapters=found.foreign,
        )
        self.state.publish(snapshot)
        return snapshot


@pytest.fixture
def policy(tmp_path):
    return AdapterPolicy(tmp_path / "denied.json")


@pytest.fixture
def watcher(tiny_base, policy):
    return StoreWatcher(StandInEngine(tiny_base), policy, Settings(adapter_watch_s=0))


def test_the_signature_changes_with_what_a_selection_reads_and_only_then(tiny_base, tmp_path):
    deny = tmp_path / "denied.json"
    first = store_signature(store_root(), deny)
    assert store_signature(store_root(), deny) == first  # nothing changed: equal

    entry = one_layer_adapter("sig-new", tiny_base)
    saved = store_signature(store_root(), deny)
    assert saved != first

    update_entry(entry.tag, labels={"stage": "production"})  # a promotion rewrites model.yaml
    relabelled = store_signature(store_root(), deny)
    assert relabelled != saved

    deny.write_text('{"denied": {}}')
    denied = store_signature(store_root(), deny)
    assert denied != relabelled

    shutil.rmtree(entry.path)  # a version deleted
    assert store_signature(store_root(), deny) != denied
    assert store_signature(tmp_path / "no-store", deny) == (
        (),
        store_signature(store_root(), deny)[1],
    )


def test_one_look_reselects_only_after_a_change_and_serves_the_new_version(watcher, tiny_base):
    engine = watcher.engine
    assert watcher.check() is True  # the first look selects (the engine's start knew no policy)
    assert watcher.check() is False and len(engine.published) == 1

    entry = one_layer_adapter("watched", tiny_base)
    assert "watched" not in engine.state.snapshot.adapters
    assert watcher.check() is True
    assert engine.state.snapshot.adapters["watched"].tag == entry.tag
    assert watcher.check() is False and len(engine.published) == 2


def backdate(entry, seconds: float = 60.0) -> None:
    """Set every file of `entry` `seconds` into the past (as a version saved a while ago)."""
    when = time.time() - seconds
    for path in entry.path.rglob("*"):
        os.utime(path, (when, when))


def test_a_reselection_rereads_only_the_versions_whose_files_changed(
    watcher, tiny_base, monkeypatch, caplog
):
    """Every version is hashed and loaded at its first check; a re-selection after another save
    reads only the new one; a damaged file is read again and refused, and its refusal is kept
    (logged once) until its files change again. A version whose files were modified within
    two seconds of its check is checked again at the next selection (its stamp could still
    miss a change)."""
    import models.adapter

    kept = one_layer_adapter("kept", tiny_base)
    damaged = one_layer_adapter("damaged", tiny_base)
    for entry in models.adapter.list_adapters():  # those earlier tests saved too
        backdate(entry)
    hashed: list[str] = []
    real_hash = models.adapter.hash_folder

    def counting(folder, *args, **kwargs):
        hashed.append(folder.name)
        return real_hash(folder, *args, **kwargs)

    monkeypatch.setattr(models.adapter, "hash_folder", counting)
    watcher.reload()
    assert {kept.path.name, damaged.path.name} <= set(hashed)

    hashed.clear()
    added = one_layer_adapter("added", tiny_base)  # saved just now
    watcher.reload()
    watcher.reload()
    assert hashed == [added.path.name] * 2  # only the new one; recent, so checked again
    backdate(added)
    hashed.clear()
    watcher.reload()
    watcher.reload()
    assert hashed == [added.path.name]
    assert {"kept", "damaged", "added"} <= set(watcher.engine.state.snapshot.adapters)

    hashed.clear()
    weights = models.adapter.weights_path(damaged)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the tensors: same size
    weights.write_bytes(bytes(data))
    backdate(damaged, 30.0)  # another modification time than before
    with caplog.at_level(logging.WARNING, logger="service.adapter_selection"):
        watcher.reload()
        watcher.reload()
    assert hashed == [damaged.path.name]  # read once, its refusal kept
    snapshot = watcher.engine.state.snapshot
    assert "damaged" not in snapshot.adapters
    assert "content hash" in snapshot.refused_adapters["damaged"]
    assert caplog.text.count(f"refusing adapter {damaged.tag}") == 1


def test_a_failed_look_changes_nothing_is_logged_and_the_next_one_retries(
    watcher, policy, tiny_base, caplog
):
    watcher.check()
    before = watcher.engine.state.snapshot
    policy.path.write_text("{not json")  # a hand-edited deny list gone wrong
    one_layer_adapter("while-broken", tiny_base)
    with caplog.at_level(logging.ERROR, logger="service.store_watcher"):
        assert watcher.check() is False
    assert "adapter store watch failed" in caplog.text and "not a deny list" in caplog.text
    assert watcher.engine.state.snapshot is before  # nothing served that the list may deny
    with pytest.raises(DenyListError):
        watcher.reload()

    policy.path.write_text('{"denied": {}}')
    assert watcher.check() is True
    assert "while-broken" in watcher.engine.state.snapshot.adapters


def test_deny_is_refused_with_its_reason_persists_and_survives_every_look(
    watcher, policy, tiny_base
):
    one_layer_adapter("denied-one", tiny_base)
    old = one_layer_adapter("versioned", tiny_base, value=0.02)
    new = one_layer_adapter("versioned", tiny_base, value=0.03)
    policy.deny("denied-one")
    policy.deny("versioned", new.version)
    snapshot = watcher.reload()
    assert snapshot.refused_adapters["denied-one"] == DENIED
    assert snapshot.adapters["versioned"].tag == old.tag  # its newest version denied: rolled back

    one_layer_adapter("denied-one", tiny_base, value=0.04)  # a new version of a denied name
    assert watcher.check() is True
    assert "denied-one" not in watcher.engine.state.snapshot.adapters
    assert watcher.engine.state.snapshot.refused_adapters["denied-one"] == DENIED

    # Written where a restart (or another replica on the same store) reads it.
    stored = json.loads(policy.path.read_text())["denied"]
    assert stored == {"denied-one": ["*"], "versioned": [new.version]}
    restarted = StoreWatcher(StandInEngine(tiny_base), AdapterPolicy(policy.path), Settings())
    restarted.start()  # applies the deny list before serving, with the thread off or on
    try:
        assert restarted.engine.state.snapshot.refused_adapters["denied-one"] == DENIED
    finally:
        restarted.stop()

    assert policy.allow("denied-one") == "denied"
    assert policy.allow("denied-one") == ""
    assert policy.allow("versioned", new.version) == f"version {new.version} denied"
    assert watcher.check() is True
    assert watcher.engine.state.snapshot.adapters["versioned"].tag == new.tag
    assert "denied-one" in watcher.engine.state.snapshot.adapters


def test_unload_holds_the_versions_of_that_moment_until_a_new_one_or_allow(
    watcher, policy, tiny_base
):
    first = one_layer_adapter("unloaded", tiny_base)
    watcher.reload()
    policy.unload("unloaded", [first.version])
    snapshot = watcher.reload()
    assert "unloaded" not in snapshot.adapters
    assert snapshot.refused_adapters["unloaded"].startswith("unloaded by an admin")
    assert watcher.engine.forgotten == [first.tag]  # its weights go
    assert watcher.check() is False  # nothing in the store changed

    later = one_layer_adapter("unloaded", tiny_base, value=0.05)
    assert watcher.check() is True
    assert watcher.engine.state.snapshot.adapters["unloaded"].tag == later.tag
    newest = one_layer_adapter("unloaded", tiny_base, value=0.06)
    assert watcher.check() is True
    assert watcher.engine.state.snapshot.adapters["unloaded"].tag == newest.tag
    # A superseded version keeps its weights for the requests validated against it.
    assert watcher.engine.forgotten == [first.tag]

    policy.unload("unloaded", [later.version, newest.version])
    assert "unloaded" not in watcher.reload().adapters
    assert policy.allow("unloaded") == "unloaded"
    assert watcher.reload().adapters["unloaded"].tag == newest.tag


def test_the_thread_serves_a_saved_version_within_the_interval_and_stops(tiny_base, policy):
    draining = []
    watcher = StoreWatcher(
        StandInEngine(tiny_base),
        policy,
        Settings(adapter_watch_s=1),
        stop_when=lambda: bool(draining),
    )
    watcher.start()
    try:
        entry = one_layer_adapter("threaded", tiny_base)
        deadline = time.monotonic() + 5
        while "threaded" not in watcher.engine.state.snapshot.adapters:
            assert time.monotonic() < deadline, "not served within the interval"
            time.sleep(0.1)
        assert watcher.engine.state.snapshot.adapters["threaded"].tag == entry.tag
        draining.append(True)  # the drain's flag ends the thread at its next look
        watcher._thread.join(5)
        assert not watcher._thread.is_alive()
    finally:
        watcher.stop()
    watcher = StoreWatcher(StandInEngine(tiny_base), policy, Settings(adapter_watch_s=1))
    watcher.start()
    started = time.monotonic()
    watcher.stop()
    assert not watcher._thread.is_alive() and time.monotonic() - started < 2


@pytest.fixture(scope="module")
def engine(tiny_base):
    save_clip(*build_tiny_clip(0), "clip-tiny", source="tiny:seed=0", reuse_identical=True)
    engine = Engine(Settings(base="sdxl-tiny", clip="clip-tiny", device="cpu", ui=False))
    yield engine
    engine.encoder.close()


def test_on_the_engine_an_unload_drops_the_weights_and_the_base_image_returns(
    engine, tiny_base, policy
):
    # Random factors: a uniform one-layer adapter adds nothing after a LayerNorm (zero mean).
    g = torch.Generator().manual_seed(0)
    weights = {f"{LAYER}.lora_A.weight": torch.randn(2, 64, generator=g)}
    weights[f"{LAYER}.lora_B.weight"] = torch.randn(64, 2, generator=g)
    entry = save_adapter("engine-unload", {"unet": weights}, tiny_info(tiny_base))
    watcher = StoreWatcher(engine, policy, engine.settings)
    assert watcher.reload().adapters["engine-unload"].tag == entry.tag
    Generate, _ = bind_requests(engine.state)

    def image(adapters: list) -> str:
        request = Generate(
            prompt="a red circle", width=64, height=64, steps=4, seed=3, adapters=adapters
        )
        return engine.generate([request])[0].images[0].image

    plain = image([])
    assert image([{"name": "engine-unload"}]) != plain  # its weights are loaded now

    policy.unload("engine-unload", [entry.version])
    assert "engine-unload" not in watcher.reload().adapters
    assert engine.adapters.forget(entry.tag) is False  # already dropped by the reload
    assert image([]) == plain
    with pytest.raises(pydantic.ValidationError, match="unloaded by an admin"):
        image([{"name": "engine-unload"}])

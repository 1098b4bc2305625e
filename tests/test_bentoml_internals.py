"""What models/store.py relies on in BentoML beyond its public API, each pinned here so that a
BentoML release that changes it fails a test naming it, instead of corrupting a store.

Reads use the public API (`bentoml.models.get`, `list`). Writes cannot: the first test shows
that the public `bentoml.models.create` leaves a half version in the store when killed, which is
why create_entry builds the entry beside the store and renames it in. If that test ever fails,
BentoML's save became atomic, and create_entry can use it instead of what the others pin.
"""

from __future__ import annotations

import inspect
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import bentoml
import pytest
import yaml

from models.store import MODEL_YAML, create_entry, store_root, update_entry

RELEASE = f"bentoml {bentoml.__version__}"

KILLED_PUBLIC_SAVE = textwrap.dedent(
    """
    import os, shutil, signal
    import bentoml

    def copy_one_file_then_die(src, dst, **kwargs):  # a kill in the middle of the copy
        first = sorted(os.listdir(src))[0]
        shutil.copy2(os.path.join(src, first), os.path.join(dst, first))
        os.kill(os.getpid(), signal.SIGKILL)

    shutil.copytree = copy_one_file_then_die
    with bentoml.models.create("half", labels={"bentolora.kind": "adapter"}) as model:
        for name in ("a.safetensors", "b.safetensors"):
            with open(os.path.join(model.path, name), "wb") as f:
                f.write(os.urandom(1 << 20))
    """
)


def test_the_public_create_leaves_a_half_version_when_killed(tmp_path):
    home = tmp_path / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(home)}
    killed = subprocess.run([sys.executable, "-c", KILLED_PUBLIC_SAVE], env=env, timeout=120)
    assert killed.returncode == -9, "the saving process was not killed mid-copy"
    versions = [p for p in (home / "models" / "half").glob("*") if p.is_dir()]
    assert versions, (
        f"{RELEASE}: a killed bentoml.models.create left no version in the store: its save may be "
        "atomic now, and models/store.create_entry could use it instead of bentoml.Model.create"
    )
    [half] = versions
    assert sorted(p.name for p in half.iterdir()) == ["a.safetensors"]  # visible, incomplete
    listed = subprocess.run(
        [sys.executable, "-m", "bentoml", "models", "list", "-o", "json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert listed.returncode != 0 or "half" in listed.stdout  # broken, or listed as if whole


def test_bentoml_Model_create_makes_the_tag_and_the_model_yaml(tmp_path):
    """create_entry's `_new_version`: `bentoml.Model.create(...)` then `model.info.dump(file)`,
    read back with `bentoml.Model.from_path`."""
    needed = {"module", "api_version", "signatures", "labels", "metadata", "context"}
    params = set(inspect.signature(bentoml.Model.create).parameters)
    assert needed <= params, (
        f"{RELEASE}: bentoml.Model.create lost keyword(s) {sorted(needed - params)}, which "
        "models/store._new_version passes"
    )
    model = bentoml.Model.create(
        "pin-create",
        module="bentolora",
        api_version="v1",
        signatures={},
        labels={"bentolora.kind": "adapter"},
        metadata={"rank": 4, "nested": {"loss": 0.5}},
        context=bentoml.models.ModelContext(framework_name="bentolora", framework_versions={}),
    )
    assert hasattr(model.info, "dump"), f"{RELEASE}: bentoml.Model.info has no dump()"
    text = io.StringIO()
    model.info.dump(text)
    (tmp_path / MODEL_YAML).write_text(text.getvalue())
    read = bentoml.Model.from_path(tmp_path)
    assert str(read.tag) == str(model.tag) and read.tag.name == "pin-create", (
        f"{RELEASE}: bentoml.Model.from_path reads the dumped model.yaml as {read.tag}"
    )
    assert read.info.labels == {"bentolora.kind": "adapter"}
    assert read.info.metadata == {"rank": 4, "nested": {"loss": 0.5}}


def test_the_store_layout_create_entry_writes():
    """`$BENTOML_HOME/models/<name>/<version>/model.yaml`, and `<name>/latest` naming the version
    that `bentoml.models.get(name)` returns: create_entry renames into the first and writes the
    second."""
    with create_entry("pin-layout", kind="adapter") as first:
        (first.path / "w.bin").write_bytes(b"1")
    with create_entry("pin-layout", kind="adapter") as second:
        (second.path / "w.bin").write_bytes(b"2")
    model = bentoml.models.get(second.tag)
    folder = Path(model.path)
    assert folder == store_root() / "pin-layout" / model.tag.version, (
        f"{RELEASE}: the model store is not at $BENTOML_HOME/models/<name>/<version> "
        f"(bentoml.models.get says {folder}); fix models/store.store_root"
    )
    assert (folder / MODEL_YAML).is_file(), f"{RELEASE}: a version's file is not {MODEL_YAML}"
    assert str(bentoml.models.get("pin-layout").tag) == second.tag
    latest = folder.parent / "latest"
    assert latest.read_text().strip() == model.tag.version
    latest.write_text(first.tag.split(":")[1])  # what models/store._write_latest does
    assert str(bentoml.models.get("pin-layout").tag) == first.tag, (
        f"{RELEASE}: bentoml.models.get(name) no longer follows <name>/latest, which "
        "models/store._write_latest writes"
    )


def test_labels_and_metadata_are_the_model_yamls_top_level_keys():
    """update_entry edits model.yaml as data: `labels` and `metadata` at the top level are what
    BentoML reads as `info.labels` and `info.metadata`, and every other field stays as it was."""
    with create_entry("pin-update", kind="adapter", metadata={"rank": 2}) as staged:
        (staged.path / "w.bin").write_bytes(b"x")
    before = bentoml.models.get(staged.tag).info
    raw = yaml.safe_load((Path(bentoml.models.get(staged.tag).path) / MODEL_YAML).read_text())
    assert raw["labels"] == before.labels and raw["metadata"] == before.metadata, (
        f"{RELEASE}: model.yaml no longer keeps labels and metadata as top-level keys; "
        "models/store.update_entry edits them there"
    )
    update_entry(staged.tag, labels={"stage": "production"}, metadata={"evaluation": {"x": 1}})
    after = bentoml.models.get(staged.tag).info
    assert after.labels == {**before.labels, "stage": "production"}
    assert after.metadata == {**before.metadata, "evaluation": {"x": 1}}
    for field in ("tag", "module", "api_version", "creation_time", "context", "signatures"):
        assert getattr(after, field) == getattr(before, field), (
            f"{RELEASE}: update_entry changed model.yaml's {field}"
        )


@pytest.mark.parametrize("home", ["~/bentoml-pin", "$PIN_ROOT/bentoml"])
def test_store_root_is_where_bentoml_keeps_its_models(home, tmp_path):
    """BENTOML_HOME with `~` or a variable in it, as BentoML expands it."""
    check = (
        "from bentoml._internal.configuration.containers import BentoMLContainer as C\n"
        "from models.store import store_root\n"
        "print(C.model_store_dir.get()); print(store_root())\n"
    )
    env = {**os.environ, "BENTOML_HOME": home, "HOME": str(tmp_path), "PIN_ROOT": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", check],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    bentoml_says, ours = result.stdout.split()
    assert Path(ours) == Path(bentoml_says), (
        f"{RELEASE}: BentoML keeps models in {bentoml_says}, models/store.store_root says {ours}"
    )

"""The model store under crashes and a full disk: a write is all or nothing, and says why it failed.

The kill and disk-full tests run the saves in subprocesses with their own BENTOML_HOME (a kill
leaves staging debris, a full disk needs a small file system of its own), and check the result on
disk, through `bentoml models list`, and by saving again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

import models.store
from models.adapter import load_adapter_weights
from models.hashing import hash_folder
from models.store import StoreError, list_entries, store_root
from tests.store_helpers import one_layer_adapter
from tests.train_helpers import train_cmd

SAVER = Path(__file__).with_name("store_saver.py")
KILLS = 10
MID_WRITE_KILLS = 5
"""Kill at least KILLS times, and until MID_WRITE_KILLS kills left a half-written version."""
MAX_KILLS = 40


def env_for(home: Path) -> dict[str, str]:
    return {**os.environ, "BENTOML_HOME": str(home)}


def complete_adapters(home: Path) -> set[str]:
    """Assert every adapter version on disk is complete and `latest` names one; return their tags.

    Complete means its files hash to the `content_hash` in its model.yaml, as create_entry
    computed it (over the files it was given, model.yaml excluded).
    """
    tags = set()
    for name_dir in sorted((home / "models").glob("lora-*")):
        versions = [d for d in name_dir.iterdir() if d.is_dir()]
        for version in versions:
            info = yaml.safe_load((version / "model.yaml").read_text())
            assert hash_folder(version) == info["metadata"]["content_hash"], f"{version} is partial"
            tags.add(f"{name_dir.name}:{version.name}")
        if versions:
            latest = (name_dir / "latest").read_text().strip()
            assert f"{name_dir.name}:{latest}" in tags, f"latest of {name_dir} names {latest!r}"
    return tags


def bentoml_list(home: Path) -> set[str]:
    """Tags that the real `bentoml models list` shows for the store in `home`."""
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "models", "list", "-o", "json"],
        capture_output=True,
        text=True,
        env=env_for(home),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return {m["tag"] for m in json.loads(result.stdout)}


def staging_leftovers(home: Path) -> list[Path]:
    staging = home / ".bentolora-staging"
    return sorted(staging.iterdir()) if staging.exists() else []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kills_during_adapter_saves_leave_only_complete_entries(tmp_path):
    """SIGKILL a process saving 4 MiB adapters at random instants, most of them mid-write.

    After each kill: every version on disk is complete, `latest` names one, the real
    `bentoml models list` shows exactly them, and the next saves work. A kill mid-write leaves
    its staging folder behind (hidden, outside the store); that is how the test counts them.
    """
    home = tmp_path / "bentoml"
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    saver = subprocess.Popen(
        [sys.executable, str(SAVER), "loop"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env_for(home),
    )
    child = None
    kills = mid_write = debris = 0
    try:
        while kills < KILLS or mid_write < MID_WRITE_KILLS:
            assert kills < MAX_KILLS, f"seed {seed}: {mid_write} of {kills} kills hit a write"
            saver.stdin.write("go\n")
            saver.stdin.flush()
            child = int(saver.stdout.readline().split()[1])
            # Saves complete after every kill: the store takes new versions afterwards. The
            # child's first save is slow (lazy imports); the second one times the others.
            first, saved = saver.stdout.readline().split(), saver.stdout.readline().split()
            assert first[0] == saved[0] == "saved", f"seed {seed}: {first} {saved}"
            time.sleep(rng.uniform(0, 2.5 * float(saved[2])))  # into the next save or two
            os.kill(child, signal.SIGKILL)
            while not (line := saver.stdout.readline()).startswith("exit"):
                assert line.startswith("saved"), f"seed {seed}: {line!r}"
            assert os.WTERMSIG(int(line.split()[2])) == signal.SIGKILL
            child = None  # reaped by the saver
            kills += 1
            mid_write += len(staging_leftovers(home)) > debris  # killed with a version half-written
            debris = len(staging_leftovers(home))

            tags = complete_adapters(home)
            assert saved[1] in tags, f"seed {seed}"
            assert bentoml_list(home) == tags, f"seed {seed}, kill {kills}"

        saver.stdin.write("go\n")  # and once more after the last kill
        saver.stdin.flush()
        child = int(saver.stdout.readline().split()[1])
        saved = saver.stdout.readline().split()
        assert saved[0] == "saved", f"seed {seed}: {saved}"
    finally:
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        saver.kill()
        saver.wait()
    assert saved[1] in complete_adapters(home)
    print(f"{mid_write} of {kills} kills left a half-written version (seed {seed})")


@contextmanager
def small_disk(path: Path, size_mib: int) -> Iterator[Path]:
    """A tmpfs of `size_mib` MiB mounted at `path` (root only), unmounted afterwards."""
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)]).returncode != 0:
            subprocess.run(["umount", "-l", str(path)])


def fill(disk: Path, leave_bytes: int = 0) -> Path:
    """Write a file on `disk` until about `leave_bytes` are free (0: until it is full)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        f.write(b"\0" * max(shutil.disk_usage(disk).free - leave_bytes, 0))
        while leave_bytes == 0:
            try:
                f.write(b"\0" * 4096)
            except OSError as err:
                assert err.errno == errno.ENOSPC
                break
    return filler


def save_once(home: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SAVER), "once"], capture_output=True, text=True, env=env_for(home)
    )


def assert_one_line_disk_full_error(stderr: str, store: Path) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "no space left" in errors[0] and "ENOSPC" in errors[0], errors[0]
    assert str(store) in errors[0]
    return errors[0]


@pytest.mark.slow
def test_full_disk_fails_the_save_clearly_and_leaves_the_store_usable(tmp_path):
    """One error line naming ENOSPC and the store; nothing partial, no staging debris; the store
    still lists, and takes the adapter once there is room."""
    with small_disk(tmp_path / "disk", 16) as disk:
        home = disk / "bentoml"
        first = save_once(home)
        assert first.returncode == 0, first.stderr[-2000:]
        before = complete_adapters(home)

        filler = fill(disk, leave_bytes=1 << 20)  # the next 4 MiB adapter does not fit
        failed = save_once(home)
        assert failed.returncode == 1
        assert_one_line_disk_full_error(failed.stderr, home / "models")
        assert complete_adapters(home) == before  # no partial entry
        assert staging_leftovers(home) == []
        assert bentoml_list(home) == before

        filler.unlink()
        again = save_once(home)
        assert again.returncode == 0, again.stderr[-2000:]
        tag = again.stdout.split()[-1]
        assert complete_adapters(home) == before | {tag}


@pytest.mark.parametrize(
    "code, raised",
    [(errno.ENOSPC, StoreError), (errno.EDQUOT, StoreError), (errno.EACCES, PermissionError)],
    ids=["disk-full", "quota", "other-errors-pass-through"],
)
def test_failure_after_the_rename_removes_the_new_version(tiny_base, monkeypatch, code, raised):
    """`latest` cannot be repointed: the published version goes too; only a full disk is called one."""

    def fail(name_dir, version):
        raise OSError(code, os.strerror(code), str(name_dir / "latest"))

    name = f"robust-latest-{code}"
    before = {e.tag for e in list_entries()}
    monkeypatch.setattr(models.store, "_write_latest", fail)
    with pytest.raises(raised) as caught:
        one_layer_adapter(name, tiny_base)
    if raised is StoreError:
        assert f"no space left on the disk holding the model store {store_root()}" in str(
            caught.value
        )
    assert {e.tag for e in list_entries()} == before
    assert not any((store_root() / f"lora-{name}").iterdir())
    assert not any((store_root().parent / ".bentolora-staging").iterdir())


@pytest.mark.slow
def test_training_says_where_its_weights_are_when_the_store_is_full(
    tiny_base, sample_dir, tmp_path
):
    """`python -m train` with the base on a full disk: it trains, cannot store, and says where
    the weights it trained are (a diffusers-format file in the run folder)."""
    base_mib = sum(f.stat().st_size for f in tiny_base.path.rglob("*") if f.is_file()) >> 20
    with small_disk(tmp_path / "disk", base_mib + 4) as disk:
        home = disk / "bentoml"
        base_dir = home / "models" / tiny_base.name
        shutil.copytree(tiny_base.path, base_dir / tiny_base.version)
        (base_dir / "latest").write_text(tiny_base.version)
        fill(disk)

        cmd = train_cmd(sample_dir, tmp_path, "full-disk", "--max-steps", "2")
        result = subprocess.run(cmd, capture_output=True, text=True, env=env_for(home))
        assert result.returncode == 1, result.stderr[-3000:]
        kept = tmp_path / "runs" / "full-disk" / "final" / "pytorch_lora_weights.safetensors"
        error = assert_one_line_disk_full_error(result.stderr, home / "models")
        assert error.endswith(f"The trained weights are kept in {kept}")
        assert all(key.startswith("unet.") for key in load_adapter_weights(kept))
        assert complete_adapters(home) == set()
        assert staging_leftovers(home) == []

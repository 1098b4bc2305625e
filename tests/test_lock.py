"""The locked dependency set: this environment holds it, it agrees with pyproject.toml, and the
tool that checks and moves it reports what it should."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tools import lock

ROOT = Path(__file__).parent.parent


def test_this_environment_holds_exactly_the_locked_versions():
    installed, _ = lock.read_environment(sys.executable)
    problems, notes = lock.compare(lock.read_lock(), installed)
    assert problems == [], "\n".join(problems)
    assert notes == [], "\n".join(notes)
    # transformers 5.24 needs peft >= 0.22 for text-encoder adapters: never locked together
    pins = {name: Version(v) for name, v in lock.read_lock().items()}
    assert pins["transformers"] < Version("5.24") or pins["peft"] >= Version("0.22")


def test_the_check_command_passes_here_and_fails_on_another_version(tmp_path, monkeypatch):
    ok = subprocess.run(
        [sys.executable, "tools/lock.py", "check"], cwd=ROOT, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "at their locked versions" in ok.stdout

    wrong = tmp_path / "lock.txt"
    text = lock.LOCK.read_text().replace(f"peft=={lock.read_lock()['peft']}", "peft==0.0.1")
    wrong.write_text(text)
    monkeypatch.setattr(lock, "LOCK", wrong)
    failed = lock.main(["check"])
    assert failed == 1


def test_every_locked_version_is_allowed_by_pyproject():
    pins = lock.read_lock()
    for line in metadata.requires("bentolora"):  # pyproject.toml's, extras included
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name not in pins:  # the `gpu` extra is not part of the locked CPU set
            assert name in {"xformers", "bitsandbytes"}, name
            continue
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} is locked but pyproject.toml says {req.specifier}"
        )


def test_the_runtime_set_is_bentolora_closure_at_the_locked_versions():
    pins, runtime = lock.read_lock(), lock.read_lock(lock.RUNTIME)
    assert all(pins[name] == version for name, version in runtime.items())
    _, needed = lock.read_environment(sys.executable)
    assert set(runtime) == {name for name in needed if name in pins}
    for name in ("torch", "diffusers", "transformers", "peft", "bentoml", "gradio", "torchao"):
        assert name in runtime
    for name in ("pytest", "playwright", "schemathesis", "ruff"):
        assert name not in runtime


def test_local_labels_and_cuda_only_packages_are_not_locked():
    installed = {
        "torch": "2.13.0+cpu",
        "nvidia-cublas-cu12": "12.8.4.1",
        "nvidia-cudnn": "9.1.0",
        "triton": "3.5.0",
        "pip": "25.0",
        "bentolora": "0.1.0",
        "numpy": "2.4.6",
    }
    assert lock.lockable(installed) == {"torch": "2.13.0", "numpy": "2.4.6"}
    # bentoml's NVML binding is an ordinary dependency, locked like any other
    assert lock.lockable({"nvidia-ml-py": "13.615.71"}) == {"nvidia-ml-py": "13.615.71"}
    # a GPU machine's CUDA build of the locked torch passes the check
    problems, notes = lock.compare({"torch": "2.13.0", "numpy": "2.4.6"}, installed)
    assert problems == [] and notes == []


def test_compare_and_changes_name_each_difference():
    locked = {"a": "1.0", "b": "2.0"}
    problems, notes = lock.compare(locked, {"a": "1.1", "c": "3.0"})
    assert problems == ["a: locked 1.0, installed 1.1", "b: locked 2.0, installed nothing"]
    assert notes == ["c 3.0 is installed but not locked"]
    assert lock.changes(locked, {"a": "1.1", "c": "3.0"}) == [
        "  ~ a 1.0 -> 1.1",
        "  - b 2.0",
        "  + c 3.0",
    ]


def test_a_malformed_lock_line_is_an_error(tmp_path):
    bad = tmp_path / "lock.txt"
    bad.write_text("# header\nnumpy>=2\n")
    try:
        lock.read_lock(bad)
    except ValueError as err:
        assert "numpy>=2" in str(err)
    else:
        raise AssertionError("a range in the lock was accepted")

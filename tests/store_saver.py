"""Saves 4 MiB adapters into the model store of `$BENTOML_HOME`, for test_robust_store.py.

`python tests/store_saver.py loop`: import once, then for every line read on stdin fork a child
that saves adapters until it is killed. The child prints `child PID`, then `saved TAG SECONDS`
after each save; the parent prints `exit PID STATUS` when the child is gone. Forking spares the
five-second import of torch and diffusers before each of the test's kills.

`python tests/store_saver.py once`: save one adapter and print `saved TAG`; a StoreError prints
`error: …` and exits 1, as the project's command-line tools do.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from models.adapter import save_adapter  # noqa: E402
from models.store import StoreEntry, StoreError  # noqa: E402
from tests.store_helpers import LAYER, tiny_info  # noqa: E402

NAME = "big"
BASE = StoreEntry("sdxl-tiny:robust", Path("."), {}, {"content_hash": "0" * 64})
"""A stand-in for the base: saving an adapter only records its tag and hash."""


def big_layers(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Rank-1024 LoRA weights on LAYER, 4 layers of them: 4 MiB, about an SDXL rank-4 adapter's size."""
    generator = torch.Generator().manual_seed(seed)
    unet = {}
    for i in range(4):
        unet[f"{LAYER}.{i}.lora_A.weight"] = torch.randn(1024, 64, generator=generator) * 0.01
        unet[f"{LAYER}.{i}.lora_B.weight"] = torch.randn(64, 1024, generator=generator) * 0.01
    return {"unet": unet}


def save_forever() -> None:
    # One thread: on a busy machine idle OpenMP workers can make the NaN check outlast the write,
    # and the test's kills should mostly land in the write.
    torch.set_num_threads(1)
    layers = big_layers(os.getpid())
    first = next(iter(layers["unet"].values()))
    for count in itertools.count():
        first[0, 0] = count  # every version holds other bytes
        started = time.perf_counter()
        entry = save_adapter(NAME, layers, tiny_info(BASE))
        print("saved", entry.tag, f"{time.perf_counter() - started:.4f}", flush=True)


def loop() -> None:
    for _ in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                save_forever()
            finally:
                os._exit(1)
        print("child", pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print("exit", pid, status, flush=True)


def once() -> int:
    try:
        entry = save_adapter(NAME, big_layers(0), tiny_info(BASE))
    except StoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("saved", entry.tag)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["loop"]:
        loop()
    elif sys.argv[1:] == ["once"]:
        raise SystemExit(once())
    else:
        raise SystemExit("usage: store_saver.py loop|once")

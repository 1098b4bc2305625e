"""Failpoints: named places where the robustness tests make the code fail on purpose.

Off unless `BENTOLORA_FAILPOINTS` is set (or `BENTOLORA_FAILPOINTS_FILE` names a file, re-read at
each hit so a running server can be changed). A spec is `point=action[:arg][@n]`, several joined
by `;`, for example `checkpoint.write=kill@2;pipeline=oom_over:1`:

- `kill`: SIGKILL this process (a crash at exactly that instant).
- `oom`: raise `torch.OutOfMemoryError`, as CUDA does when a batch does not fit.
- `oom_over:N`: the same, only when the call handles more than N items.
- `cuda_error`: raise `torch.AcceleratorError`, as an illegal memory access does.
- `hang`: wait there until the spec no longer sets `hang` at that point (a slow or stuck call
  that a test ends by rewriting the file or the variable).
- `@n`: act only on the n-th time the point is reached in this process (every time without it).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter
from pathlib import Path

ENV = "BENTOLORA_FAILPOINTS"
FILE_ENV = "BENTOLORA_FAILPOINTS_FILE"
ACTIONS = ("kill", "oom", "oom_over", "cuda_error", "hang")

log = logging.getLogger(__name__)
_hits: Counter[str] = Counter()


def parse(spec: str) -> dict[str, tuple[str, int | None, int | None]]:
    """`point=action[:arg][@n];…` -> {point: (action, arg, n)}; ValueError on a malformed spec."""
    points = {}
    for part in filter(None, (p.strip() for p in spec.replace(",", ";").split(";"))):
        point, sep, rule = part.partition("=")
        rule, _, nth = rule.partition("@")
        action, _, arg = rule.partition(":")
        if not sep or action not in ACTIONS:
            raise ValueError(f"{ENV}: {part!r} is not point=action with action in {ACTIONS}")
        points[point.strip()] = (action, int(arg) if arg else None, int(nth) if nth else None)
    return points


def _active() -> str:
    path = os.environ.get(FILE_ENV)
    if path:
        try:
            return Path(path).read_text()
        except OSError:
            return ""
    return os.environ.get(ENV, "")


def reached(point: str) -> int:
    """Times `point` was reached in this process while some failpoint spec was set."""
    return _hits[point]


def _hanging(point: str) -> bool:
    try:
        rule = parse(_active()).get(point)
    except ValueError:  # a file caught while being rewritten: look again
        return True
    return rule is not None and rule[0] == "hang"


def hit(point: str, size: int = 1) -> None:
    """Mark that `point` is reached (handling `size` items); act if a failpoint is set there."""
    spec = _active()
    if not spec:
        return
    rule = parse(spec).get(point)
    _hits[point] += 1
    if rule is None:
        return
    action, arg, nth = rule
    if nth is not None and _hits[point] != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "hang":
        log.warning("failpoint %s: hanging until the spec no longer sets hang there", point)
        while _hanging(point):
            time.sleep(0.05)
        return
    import torch

    if action == "oom" or (action == "oom_over" and size > (arg or 0)):
        raise torch.OutOfMemoryError(f"CUDA out of memory (failpoint {point}, {size} items)")
    if action == "cuda_error":
        raise torch.AcceleratorError(
            f"CUDA error: an illegal memory access was encountered (failpoint {point})"
        )

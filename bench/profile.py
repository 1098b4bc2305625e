"""Where the time goes: one call under torch.profiler, the top operators and a summary by kind.

Written for a target the run does not reach: `profile-<name>.txt` holds the operator table
(self time on the device when on CUDA, else on the CPU), and the summary (share of time in
matmuls, convolutions, attention, normalization, inductor's fused kernels, the rest) goes into
results.json.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

log = logging.getLogger(__name__)

KINDS = (
    ("attention", re.compile(r"attention|flash|fmha|sdpa|efficient_attention", re.I)),
    (
        "matmul",
        re.compile(
            r"\b(aten::)?(mm|addmm|bmm|matmul|linear|baddbmm)\b|gemm|cutlass|sm\d+_xmma", re.I
        ),
    ),
    ("convolution", re.compile(r"conv|cudnn|implicit_gemm|winograd", re.I)),
    ("normalization", re.compile(r"norm", re.I)),
    ("inductor fused", re.compile(r"^triton_|cpp_fused|graph_", re.I)),
    ("copies", re.compile(r"copy|contiguous|to_copy|clone|cat\b", re.I)),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def profile_call(call: Callable[[], object], device: str, out_dir: Path, name: str) -> dict:
    """Profile one `call` (after one unprofiled call); write the table, return the summary."""
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    call()
    with profile(activities=activities) as prof:
        call()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    attribute = "self_device_time_total" if cuda else "self_cpu_time_total"
    times = [(e.key, float(getattr(e, attribute, 0.0))) for e in events]
    total = sum(t for _, t in times) or 1.0
    by_kind: dict[str, float] = {}
    for key, t in times:
        by_kind[kind_of(key)] = by_kind.get(kind_of(key), 0.0) + t
    summary = {
        "profiled": name,
        "time_kind": "device (CUDA kernels)" if cuda else "CPU",
        "total_s": total / 1e6,
        "share": {k: round(v / total, 4) for k, v in sorted(by_kind.items(), key=lambda x: -x[1])},
        "top": [
            {"op": key, "s": t / 1e6, "share": round(t / total, 4)}
            for key, t in sorted(times, key=lambda x: -x[1])[:15]
        ],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    path = out_dir / f"profile-{safe}.txt"
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    share = "\n".join(f"  {k}: {v:.1%}" for k, v in summary["share"].items())
    path.write_text(
        f"{name}\nself time by kind ({summary['time_kind']}, {summary['total_s']:.3f} s):\n"
        f"{share}\n\n{events.table(sort_by=sort_by, row_limit=40)}\n"
    )
    log.info("profile of %s: %s", name, path)
    return summary

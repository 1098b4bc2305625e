"""The results table: ratios against the baseline rows, markdown for people, JSON for tools."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.measure import Row

COLUMNS = (
    "section",
    "row",
    "images/s",
    "p50 s",
    "p95 s",
    "TFLOP/s",
    "floor s/img",
    "peak GiB",
    "warm-up s",
    "vs",
    "ratio",
)


def set_ratios(rows: list[Row]) -> None:
    """Each row's images/s over its baseline row's (named in `row.baseline`), same run."""
    by_name = {r.name: r for r in rows}
    for row in rows:
        reference = by_name.get(row.baseline)
        if reference is not None and reference.images_per_s > 0:
            row.ratio = row.images_per_s / reference.images_per_s


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}"


def table(rows: list[Row], peak_tflops: float | None) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in rows:
        floor = (
            r.flops_per_image / (peak_tflops * 1e12)
            if peak_tflops and r.section != "train"
            else float("nan")
        )
        cells = [
            r.section,
            r.name,
            _fmt(r.images_per_s),
            _fmt(r.latency(50)),
            _fmt(r.latency(95)),
            _fmt(r.tflops()),
            _fmt(floor),
            _fmt(r.peak_memory_gb),
            _fmt(r.warmup_s),
            r.baseline or "–",
            _fmt(r.ratio),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def correctness_table(correctness: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| path | compared with eager diffusers, same seeds | max abs diff (0-255) | PSNR dB |",
        "| --- | --- | --- | --- |",
    ]
    for path, cases in correctness.items():
        for case, d in cases.items():
            lines.append(
                f"| {path} | {case} | {_fmt(d['max_abs_diff'])} | {_fmt(d['psnr_db'], 4)} |"
            )
    return "\n".join(lines)


def profile_summary(profiles: list[dict]) -> str:
    """One line per profiled call: its self time by kind of operator."""
    return "\n".join(
        f"- profile of {p['profiled']} ({p['time_kind']}, {p['total_s']:.3g} s): "
        + ", ".join(f"{kind} {share:.0%}" for kind, share in p["share"].items())
        for p in profiles
    )


def write(out: Path, header: dict[str, Any], rows: list[Row], correctness: dict) -> str:
    """Write results.json and results.md into `out`; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    markdown = "\n\n".join(
        part
        for part in [
            "\n".join(f"- {k}: {v}" for k, v in header.items() if k not in ("flops", "profiles")),
            table(rows, header.get("peak_tflops")),
            correctness_table(correctness) if correctness else "",
            profile_summary(header.get("profiles", [])),
        ]
        if part
    )
    data = {**header, "rows": [r.to_dict() for r in rows], "correctness": correctness}
    (out / "results.json").write_text(json.dumps(data, indent=2, default=str))
    (out / "results.md").write_text(markdown + "\n")
    return markdown

"""The report every run writes: `report.html` with PNG plots and validation grids beside it.

Loss (raw and smoothed), learning rate, fixed-noise validation loss and CLIP score over steps, a
grid of the validation images per checkpoint (same seeds, so changes are the adapter's), the
config and the dataset summary. Plain files: open the HTML in a browser, no server needed.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from train.metrics import read_metrics

log = logging.getLogger(__name__)

PLOT_SIZE_PX = (800, 400)
SMOOTHING = 0.9
"""Weight of the past in the smoothed loss (an exponential moving average, as TensorBoard's)."""


def smooth(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average with bias correction, so the first points are not pulled to 0."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
    return [s for s, _ in points], [float(v) for _, v in points]


def _plot(path: Path, title: str, lines: Sequence[tuple[str, list[int], list[float]]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    dpi = 100
    fig, ax = plt.subplots(figsize=(PLOT_SIZE_PX[0] / dpi, PLOT_SIZE_PX[1] / dpi), dpi=dpi)
    for label, steps, values in lines:
        ax.plot(steps, values, label=label, marker="o" if len(steps) < 20 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def validation_grid(folder: Path, out: Path) -> Path | None:
    """The validation images of one checkpoint side by side, in prompt order."""
    images = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
    if not images:
        return None
    width, height = images[0].size
    grid = Image.new("RGB", (width * len(images), height), "white")
    for i, image in enumerate(images):
        grid.paste(image, (i * width, 0))
    grid.save(out)
    return out


def write_report(
    run_dir: str | Path,
    *,
    config: Mapping[str, Any],
    dataset: Mapping[str, Any],
    summary: Mapping[str, Any],
    prompts: Sequence[str] = (),
) -> Path:
    """Write `<run_dir>/report.html` and its images into `<run_dir>/report/`; return the HTML path."""
    run_dir = Path(run_dir)
    assets = run_dir / "report"
    assets.mkdir(parents=True, exist_ok=True)
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []

    plots = []
    steps, loss = _series(records, "loss")
    if steps:
        plots.append(
            _plot(
                assets / "loss.png",
                "training loss",
                [("raw", steps, loss), (f"smoothed ({SMOOTHING})", steps, smooth(loss))],
            )
        )
        plots.append(_plot(assets / "lr.png", "learning rate", [("lr", *_series(records, "lr"))]))
    for key, title in (
        ("validation_loss", "fixed-noise validation loss"),
        ("clip_score", "CLIP score of validation images vs their prompts"),
    ):
        steps, values = _series(records, key)
        if steps:
            plots.append(_plot(assets / f"{key}.png", title, [(key, steps, values)]))

    grids = []
    for folder in sorted((run_dir / "validation").glob("step-*")):
        grid = validation_grid(folder, assets / f"grid-{folder.name}.png")
        if grid is not None:
            grids.append((int(folder.name.removeprefix("step-")), grid))

    path = run_dir / "report.html"
    path.write_text(_html(run_dir.name, plots, grids, prompts, config, dataset, summary))
    log.info("report: %s", path)
    return path


def _html(name, plots, grids, prompts, config, dataset, summary) -> str:
    def rel(p: Path) -> str:
        return html.escape(f"report/{p.name}")

    def table(mapping: Mapping[str, Any]) -> str:
        rows = "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v, default=str))}</td></tr>"
            for k, v in mapping.items()
        )
        return f"<table>{rows}</table>"

    prompt_list = "".join(f"<li>{html.escape(p)}</li>" for p in prompts)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>bentolora run {html.escape(name)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}img{max-width:100%;"
        "image-rendering:pixelated}th{text-align:left;padding-right:1em;vertical-align:top}"
        "td{font-family:monospace}img.grid{min-width:384px}</style></head><body>",
        f"<h1>Run {html.escape(name)}</h1>",
        "<h2>Result</h2>",
        table(summary),
        "<h2>Curves</h2>",
        *(f"<p><img src='{rel(p)}' alt='{html.escape(p.stem)}'></p>" for p in plots),
        "<h2>Validation images</h2>",
        f"<p>Same seeds at every checkpoint; prompts left to right:</p><ol>{prompt_list}</ol>"
        if prompts
        else "<p>No validation prompts configured.</p>",
        *(
            f"<h3>step {step}</h3><p><img class='grid' src='{rel(grid)}' alt='step {step}'></p>"
            for step, grid in grids
        ),
        "<h2>Dataset</h2>",
        table(dataset),
        "<h2>Config</h2>",
        table(config),
        "</body></html>",
    ]
    return "\n".join(parts)

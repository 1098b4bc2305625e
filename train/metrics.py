"""Training metrics as JSON lines (always) and TensorBoard scalars (when installed)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON object per record to `metrics.jsonl`; mirrors numbers to TensorBoard."""

    def __init__(
        self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None
    ):
        """Start a new log, or, resuming at `resume_step`, keep the records up to that step only
        (a killed run may have logged steps that the resumed run will compute again)."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = ""
        if resume_step is not None and self.path.exists():
            kept = "".join(
                line + "\n"
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            )
        self._file = open(self.path, "w")  # noqa: SIM115 - closed in close()
        self._file.write(kept)
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard not installed; metrics go to %s only", self.path)
            else:
                self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

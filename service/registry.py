"""What this server can serve, for request validation: set once the models are loaded.

Request models check adapter names and prompt lengths against it while BentoML parses each
request, so a bad request gets its own 400 before it can join (and fail) a batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from service.settings import Settings


@dataclass
class Served:
    settings: Settings = field(default_factory=Settings)
    base_tag: str = ""
    adapters: dict[str, Any] = field(default_factory=dict)
    """Adapter name (without `lora-`) -> StoreEntry of the version served."""
    foreign_adapters: dict[str, str] = field(default_factory=dict)
    """Adapters in the store made for other bases: name -> their base tag."""
    refused_adapters: dict[str, str] = field(default_factory=dict)
    """Adapters made for this base that failed a check: name -> why (see verify_adapter)."""
    tokenizers: tuple = ()
    ready: bool = False
    broken: str = ""
    """Why the GPU can no longer be used (an unrecoverable CUDA error); /livez fails when set."""
    seconds_per_request: dict[str, float] = field(default_factory=dict)
    """Recent compute seconds per request, per endpoint: what Retry-After is estimated from."""
    reload_adapters: Any = None
    """Callable re-reading the store (the admin route calls it); set by the engine."""

    default_size: int = 1024
    """The base's native image side in pixels (what the UI offers first)."""
    progress: tuple[int, int] = (0, 0)
    """(step done, steps) of the batch denoising now; (0, 0) when the GPU is idle. Read by the UI."""

    unavailable: tuple[float, str] = (0.0, "")
    """(monotonic time, why) of the last 503 the engine raised: the body of that 503."""

    def mark_unavailable(self, why: str) -> str:
        self.unavailable = (time.monotonic(), why)
        return why

    def recent_unavailable_reason(self, within_s: float = 10.0) -> str:
        at, why = self.unavailable
        return why if time.monotonic() - at < within_s else ""

    def record_batch(self, endpoint: str, seconds: float, requests: int) -> None:
        previous = self.seconds_per_request.get(endpoint)
        value = seconds / max(requests, 1)
        self.seconds_per_request[endpoint] = (
            value if previous is None else 0.8 * previous + 0.2 * value
        )

    def adapter_rows(self) -> list[dict[str, Any]]:
        """What GET /adapters shows of each adapter: identity, shape and training metrics."""
        rows = []
        for name, entry in sorted(self.adapters.items()):
            meta = entry.metadata
            rows.append(
                {
                    "name": name,
                    "version": entry.version,
                    "tag": entry.tag,
                    "base": meta.get("base_tag"),
                    "rank": meta.get("rank"),
                    "alpha": meta.get("alpha"),
                    "targets": meta.get("target_modules"),
                    "text_encoder_lora": meta.get("text_encoder_lora"),
                    "steps": meta.get("steps"),
                    "final_loss": meta.get("final_loss"),
                    "validation": meta.get("validation"),
                    "dataset_fingerprint": meta.get("dataset", {}).get("fingerprint"),
                }
            )
        return [_json_safe(row) for row in rows]


def _json_safe(value: Any) -> Any:
    """Non-finite floats (an adapter stored without a final loss has NaN) become null: JSON has
    no NaN, and one such adapter must not break the listing."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


SERVED = Served()

"""What this server can serve, for request validation: set once the models are loaded.

Request models check adapter names and prompt lengths against it while BentoML parses each
request, so a bad request gets its own 400 before it can join (and fail) a batch.
"""

from __future__ import annotations

import math
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
    tokenizers: tuple = ()
    ready: bool = False

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

"""What this server serves and how it is doing: the state a service instance owns, in the open.

- `ServedSnapshot` (immutable): the settings, the base and its native image size, the adapters
  served (name -> the store entry of the version served), the ones refused or made for another
  base (with why), and the tokenizers that prompt lengths are checked with. Loading the models
  builds the first one; an adapter reload builds a new one and publishes it with one
  assignment, so a reader sees the old snapshot or the new one, never half of each.
- `LiveStatus`: what changes while the engine works: the denoising progress, recent seconds per
  request (Retry-After), the last 503's reason, and `broken`. The engine is its only writer.
- `ServerState`: the holder of both, one per server process, made by the service module and
  passed to what reads it: the engine (the only writer), the admission middleware, the admin
  routes, the UI, and the request models. BentoML builds those before it creates the service
  instance and parses requests with no context, so request validation reaches the state through
  the models `service.schemas.bind_requests` makes for the service (the one such place).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from service.settings import Settings

if TYPE_CHECKING:
    from models.store import StoreEntry


@dataclass(frozen=True)
class ServedSnapshot:
    """What this server serves, as of one load or adapter reload. Never changed in place: a
    reload makes a new one (`dataclasses.replace`) and `ServerState.publish`es it."""

    settings: Settings = field(default_factory=Settings)
    loaded: bool = False
    """The models are loaded (the engine published this snapshot); until then request
    validation checks only what needs no model, and /adapters answers 503."""
    base_tag: str = ""
    default_size: int = 1024
    """The base's native image side in pixels (what the UI offers first)."""
    adapters: Mapping[str, StoreEntry] = field(default_factory=dict)
    """Adapter name (without `lora-`) -> StoreEntry of the version served."""
    refused_adapters: Mapping[str, str] = field(default_factory=dict)
    """Adapters made for this base that failed a check: name -> why (see verify_adapter)."""
    foreign_adapters: Mapping[str, str] = field(default_factory=dict)
    """Adapters in the store made for other bases: name -> their base tag."""
    tokenizers: tuple = ()
    """The base's two tokenizers, own instances used only by request validation (on the event
    loop): a fast tokenizer shared with the pipeline's thread switches padding under it."""

    def __post_init__(self) -> None:
        for name in ("adapters", "refused_adapters", "foreign_adapters"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def why_not_served(self, name: str) -> str:
        """The message for a request naming `name`, which this snapshot does not serve."""
        if name in self.refused_adapters:
            return f"adapter {name!r} is refused by this server: {self.refused_adapters[name]}"
        if name in self.foreign_adapters:
            return (
                f"adapter {name!r} was made for base {self.foreign_adapters[name]}, "
                f"not for the base this server runs ({self.base_tag})"
            )
        names = sorted(self.adapters)
        known = ", ".join(names[:20]) + (
            f" and {len(names) - 20} more (GET /adapters/)" if len(names) > 20 else ""
        )
        return f"unknown adapter {name!r}; this server has: {known or 'none'}"

    def listing(self, tiers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The body of GET /adapters/ (and of POST /adapters/reload); `tiers`: where each loaded
        adapter's weights are (LiveStatus.adapter_tiers)."""
        return {
            "base": self.base_tag,
            "adapters": self.adapter_rows(tiers or {}),
            "refused": dict(self.refused_adapters),
        }

    def adapter_rows(self, tiers: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """What GET /adapters shows of each adapter: identity, where its weights are (device,
        host memory, or only the store), shape and training metrics."""
        tiers = tiers or {}
        rows = []
        for name, entry in sorted(self.adapters.items()):
            meta = entry.metadata
            rows.append(
                {
                    "name": name,
                    "version": entry.version,
                    "tag": entry.tag,
                    "tier": tiers.get(entry.tag, "store"),
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


class LiveStatus:
    """How the server is doing now. Written by the engine only; read by the health checks, the
    admission middleware (Retry-After, 503 bodies) and the UI (progress)."""

    def __init__(self) -> None:
        self.progress: tuple[int, int] = (0, 0)
        """(step done, steps) of the batch denoising now; (0, 0) when the GPU is idle."""
        self.broken = ""
        """Why the GPU can no longer be used (an unrecoverable CUDA error); /livez fails when set."""
        self.seconds_per_request: dict[str, float] = {}
        """Recent compute seconds per request, per endpoint: what Retry-After is estimated from."""
        self.unavailable: tuple[float, str] = (0.0, "")
        """(monotonic time, why) of the last 503 the engine raised: the body of that 503."""
        self.adapter_tiers: dict[str, str] = {}
        """Store tag -> "device" or "host" for each adapter whose weights are loaded (replaced
        whole by the adapter cache on each change)."""

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


class ServerState:
    """The holder: the current `ServedSnapshot` (read through `snapshot`, replaced only by
    `publish`) and the engine's `LiveStatus` (`live`)."""

    def __init__(self, settings: Settings | None = None):
        self._snapshot = ServedSnapshot(settings=settings or Settings())
        self.live = LiveStatus()

    @property
    def snapshot(self) -> ServedSnapshot:
        """What is served now. Read it once per decision and use that object throughout: a
        reload may publish another one meanwhile."""
        return self._snapshot

    def publish(self, snapshot: ServedSnapshot) -> None:
        """Serve `snapshot` from now on (one assignment: readers see the old one or this one)."""
        self._snapshot = snapshot

    @property
    def ready(self) -> bool:
        """The models are loaded and the GPU still works (what /readyz answers)."""
        return self._snapshot.loaded and not self.live.broken

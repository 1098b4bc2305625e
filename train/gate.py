"""The quality gate: does a candidate beat its reference on one metric by a margin?"""

from __future__ import annotations

import math
from dataclasses import dataclass

from models.quality import HIGHER_IS_BETTER


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def gain(metric: str, candidate: float, reference: float) -> float:
    """How much better `candidate` is than `reference` on `metric` (negative: worse)."""
    return candidate - reference if HIGHER_IS_BETTER[metric] else reference - candidate


def better(metric: str, candidate: float, reference: float) -> bool:
    return gain(metric, candidate, reference) > 0


def decide(
    metric: str, candidate: float, reference: float, *, margin: float, reference_name: str
) -> Decision:
    """Promote only when the candidate improves on the reference by more than `margin`."""
    direction = "higher" if HIGHER_IS_BETTER[metric] else "lower"
    improvement = gain(metric, candidate, reference)
    facts = (
        f"{metric} {candidate:.4f} vs {reference:.4f} for {reference_name} "
        f"({direction} is better): improvement {improvement:+.4f}"
    )
    if not math.isfinite(improvement):
        return Decision(False, f"{facts} is not a number")
    if improvement > margin:
        return Decision(True, f"{facts} > margin {margin:g}")
    return Decision(False, f"{facts} is not more than margin {margin:g}")

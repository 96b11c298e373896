"""Non-finite loss or gradient norm: the most important point a run will ever send."""
from __future__ import annotations

import math
from typing import Iterable, Mapping

from .base import AlertEvent


class NonFiniteDetector:
    """Fires once when a watched series becomes NaN or +-Inf, resolves when it is finite again.

    One alert per incident: while a series stays non-finite, further points do not fire again.
    State is the set of (rank, series) currently firing; the collector restores it from its store.
    """

    rule = "non_finite"
    severity = "page"

    def __init__(self, watched: Iterable[str] = ("loss", "grad_norm"), firing: Iterable[tuple[int, str]] = ()):
        self.watched = tuple(watched)
        self.firing: set[tuple[int, str]] = set(firing)

    def update(self, step: int, values: Mapping[str, float], rank: int = 0):
        events = []
        for name in self.watched:
            if name not in values:
                continue
            v = values[name]
            key = (rank, name)
            if not math.isfinite(v) and key not in self.firing:
                self.firing.add(key)
                spelled = "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")
                events.append(AlertEvent(self.rule, self.severity, "firing", name, step, rank, v,
                                         f"{name} is {spelled} at step {step} on rank {rank}"))
            elif math.isfinite(v) and key in self.firing:
                self.firing.discard(key)
                events.append(AlertEvent(self.rule, self.severity, "resolved", name, step, rank, v,
                                         f"{name} is finite again ({v:.6g}) at step {step} on rank {rank}"))
        return events

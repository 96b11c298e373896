"""Non-finite loss or gradient norm: the most important point a run will ever send."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from .base import AlertEvent, OpenIncidents, SeriesColumns


class NonFiniteDetector(OpenIncidents):
    """Fires once when a watched series becomes NaN or +-Inf, resolves when it is finite again.

    One alert per incident: while a series stays non-finite, further points do not fire again.
    State is the set of (rank, series) currently firing; the collector restores it from its store.
    """

    rule = "non_finite"
    severity = "page"
    needs_prefixes: tuple[str, ...] = ()

    def __init__(self, watched: Iterable[str] = ("loss", "grad_norm"), firing: Iterable[tuple[int, str]] = ()) -> None:
        super().__init__(firing)
        self.watched = tuple(watched)
        self.needs: tuple[str, ...] = self.watched

    def _event(self, name: str, step: int, rank: int, v: float) -> AlertEvent:
        if math.isfinite(v):
            return AlertEvent(
                self.rule,
                self.severity,
                "resolved",
                name,
                step,
                rank,
                v,
                f"{name} is finite again ({v:.6g}) at step {step} on rank {rank}",
            )
        spelled = "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")  # for people, not the wire
        return AlertEvent(
            self.rule,
            self.severity,
            "firing",
            name,
            step,
            rank,
            v,
            f"{name} is {spelled} at step {step} on rank {rank}",
        )

    def update(self, step: int, values: Mapping[str, float], rank: int = 0) -> list[AlertEvent]:
        events = []
        for name in self.watched:
            if name not in values:
                continue
            v = values[name]
            key = (rank, name)
            if math.isfinite(v) == (key in self.firing):  # a transition: finite while firing, or the reverse
                (self.firing.discard if math.isfinite(v) else self.firing.add)(key)
                events.append(self._event(name, step, rank, v))
        return events

    def update_columns(self, steps: np.ndarray, series: SeriesColumns, rank: int = 0) -> list[AlertEvent]:
        found: list[
            tuple[int, int, AlertEvent]
        ] = []  # (record index, watched position, event): sorted into the order update() gives
        for pos, name in enumerate(self.watched):
            if name not in series:
                continue
            idx, values = series[name]
            if not len(values):
                continue
            key = (rank, name)
            bad = ~np.isfinite(values)
            before = np.empty_like(bad)  # the state each point is judged against
            before[0] = key in self.firing
            before[1:] = bad[:-1]
            # Only the transitions reach Python; a batch without an incident costs two array passes.
            for j in np.flatnonzero(bad != before).tolist():
                i = int(idx[j])
                found.append((i, pos, self._event(name, int(steps[i]), rank, float(values[j]))))
            (self.firing.add if bad[-1] else self.firing.discard)(key)
        found.sort(key=lambda f: f[:2])
        return [ev for _, _, ev in found]

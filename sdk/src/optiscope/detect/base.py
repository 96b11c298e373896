"""The detector protocol, the alert event every detector returns, and the open-incident state
every detector keeps."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class AlertEvent:
    rule: str  # stable identifier of the rule, e.g. "non_finite"
    severity: str  # "page" or "warning"
    state: str  # "firing" or "resolved"
    series: str  # the series that triggered it
    step: int
    rank: int
    value: float  # the triggering value (may be NaN or +-Inf)
    message: str  # one human sentence
    #: what triggered it: the window of steps, the values and thresholds compared, the baseline
    evidence: Mapping[str, Any] = field(default_factory=dict, compare=False)


#: One batch, column by column, as the collector feeds it: the steps of the batch's records (in
#: arrival order) and, per series, the indices of the records that hold it and their values.
SeriesColumns = Mapping[str, tuple[np.ndarray, np.ndarray]]


class Detector(Protocol):
    """What the collector (and a trainer that runs detection in-process) relies on.

    - ``rule``: the rule's stable identifier; its events carry it, and the collector's alerts
      table keys open incidents by it.
    - ``severity``: ``"page"`` or ``"warning"``.
    - ``needs``: the exact names of the series the detector reads. After a restart, or on a
      replica that missed batches, the collector replays the stored points of exactly these
      series (of every detector together) through ``update`` before the next batch.
    - ``needs_prefixes``: prefixes of further series it reads (one series per parameter tensor,
      e.g. ``update_ratio/param/``). These are *not* replayed: their number is unbounded, so a
      rule that reads them rebuilds its per-tensor baselines from the batches that follow.
    - ``update``: the alert transitions (firing or resolved) one record causes, in order.
    - ``update_columns``: the same transitions for a whole batch, computed a series at a time.
    - ``restore_firing``: the open incidents of one rank, as the collector's alerts table has them
      (the truth across replicas), replacing what the detector believed was open for that rank.
    """

    # Read-only to the collector: a class attribute or a property satisfies each.
    @property
    def rule(self) -> str: ...

    @property
    def severity(self) -> str: ...

    @property
    def needs(self) -> tuple[str, ...]: ...

    @property
    def needs_prefixes(self) -> tuple[str, ...]: ...

    def update(self, step: int, values: Mapping[str, float], rank: int = 0) -> list[AlertEvent]:
        """The transitions this record (the values of one step on one rank) causes."""
        ...

    def update_columns(self, steps: np.ndarray, series: SeriesColumns, rank: int = 0) -> list[AlertEvent]:
        """The same transitions ``update`` would return for each record in turn, in record order,
        computed a whole series at a time (the collector's path: no Python work per point)."""
        ...

    def restore_firing(self, rank: int, series: Iterable[str]) -> None:
        """The open incidents of ``rank`` are exactly these series (this rule's, as the collector's
        alerts table has them): they fire no second alert, and resolve when their condition ends;
        any other series of ``rank`` is not firing, and fires on its next incident."""
        ...


class OpenIncidents:
    """The open incidents of a detector, one alert per incident: the set ``firing`` of
    ``(rank, series)`` that fired and have not resolved. ``firing`` given at construction, or
    ``restore_firing`` later, restores what the collector's store has."""

    def __init__(self, firing: Iterable[tuple[int, str]] = ()) -> None:
        self.firing: set[tuple[int, str]] = set(firing)

    def restore_firing(self, rank: int, series: Iterable[str]) -> None:
        self.firing.difference_update({k for k in self.firing if k[0] == rank})
        self.firing.update((rank, s) for s in series)

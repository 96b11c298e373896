"""The detector protocol and the alert event every detector returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import numpy as np


@dataclass(frozen=True)
class AlertEvent:
    rule: str            # stable identifier of the rule, e.g. "non_finite"
    severity: str        # "page" or "warning"
    state: str           # "firing" or "resolved"
    series: str          # the series that triggered it
    step: int
    rank: int
    value: float         # the triggering value (may be NaN or +-Inf)
    message: str         # one human sentence
    #: what triggered it: the window of steps, the values and thresholds compared, the baseline
    evidence: Mapping[str, Any] = field(default_factory=dict, compare=False)


#: One batch, column by column, as the collector feeds it: the steps of the batch's records (in
#: arrival order) and, per series, the indices of the records that hold it and their values.
SeriesColumns = Mapping[str, tuple[np.ndarray, np.ndarray]]


class Detector(Protocol):
    def update(self, step: int, values: Mapping[str, float], rank: int = 0) -> list[AlertEvent]: ...

    def update_columns(self, steps: np.ndarray, series: SeriesColumns, rank: int = 0) -> list[AlertEvent]:
        """The same transitions ``update`` would return for each record in turn, in record order,
        computed a whole series at a time (the collector's path: no Python work per point)."""
        ...

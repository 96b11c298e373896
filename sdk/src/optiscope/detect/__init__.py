"""Streaming detectors: pure functions of a series stream, no I/O.

A detector is anything that satisfies ``Detector`` (``base.py``): ``update(step, values, rank)
-> list[AlertEvent]`` is fed each record's values in arrival order and returns the alert
transitions (firing or resolved) that the record causes; ``update_columns(steps, series, rank)``
returns the same transitions for a whole batch at once, a series at a time, which is how the
collector runs it; ``rule``, ``severity``, ``needs``/``needs_prefixes`` (the series it reads) and
``restore_firing`` (the open incidents the collector's store has) are what the collector reads and
restores. The collector runs the same code for every run; a trainer may run it in-process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import AlertEvent, Detector, OpenIncidents, SeriesColumns
from .nonfinite import NonFiniteDetector
from .rules import EarlyDivergence, LossRegression, LrAboveSchedule, LrOffSchedule, OverflowForecast
from .warnings import EpsHeadroomCollapse, UpdateBimodality, UpdateRatioOutlier, VUnderestimationBurst

__all__ = [
    "AlertEvent",
    "Detector",
    "EarlyDivergence",
    "EpsHeadroomCollapse",
    "LossRegression",
    "LrAboveSchedule",
    "LrOffSchedule",
    "NonFiniteDetector",
    "OpenIncidents",
    "OverflowForecast",
    "SeriesColumns",
    "UpdateBimodality",
    "UpdateRatioOutlier",
    "VUnderestimationBurst",
    "default_detectors",
]


def default_detectors(config: Mapping[str, Any] | None = None) -> list[Detector]:
    """The rules the collector runs for every run, given the run's config (its declared schedule,
    planned data changes): paging rules first, then warnings."""
    return [
        NonFiniteDetector(),
        OverflowForecast(config),
        LrAboveSchedule(config),
        EarlyDivergence(config),
        LossRegression(config),
        LrOffSchedule(config),
        VUnderestimationBurst(config),
        UpdateBimodality(config),
        UpdateRatioOutlier(config),
        EpsHeadroomCollapse(config),
    ]

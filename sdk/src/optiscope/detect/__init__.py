"""Streaming detectors: pure functions of a series stream, no I/O.

A detector is anything with ``update(step, values, rank) -> list[AlertEvent]``: it is fed each
record's values in arrival order and returns the alert transitions (firing or resolved) that the
record causes. ``update_columns(steps, series, rank)`` returns the same transitions for a whole
batch at once, a series at a time, which is how the collector runs it. The collector runs the same
code for every run; a trainer may run it in-process.
"""
from __future__ import annotations

from typing import Any, Mapping

from .base import AlertEvent, Detector, SeriesColumns
from .nonfinite import NonFiniteDetector
from .rules import EarlyDivergence, LossRegression, LrAboveSchedule, LrOffSchedule, OverflowForecast
from .warnings import EpsHeadroomCollapse, UpdateBimodality, UpdateRatioOutlier, VUnderestimationBurst

__all__ = ["AlertEvent", "Detector", "EarlyDivergence", "EpsHeadroomCollapse", "LossRegression", "LrAboveSchedule",
           "LrOffSchedule", "NonFiniteDetector", "OverflowForecast", "SeriesColumns", "UpdateBimodality", "UpdateRatioOutlier", "VUnderestimationBurst",
           "default_detectors"]


def default_detectors(config: Mapping[str, Any] | None = None) -> list[Detector]:
    """The rules the collector runs for every run, given the run's config (its declared schedule,
    planned data changes): paging rules first, then warnings."""
    return [NonFiniteDetector(), OverflowForecast(config), LrAboveSchedule(config), EarlyDivergence(config),
            LossRegression(config),
            LrOffSchedule(config), VUnderestimationBurst(config), UpdateBimodality(config), UpdateRatioOutlier(config),
            EpsHeadroomCollapse(config)]

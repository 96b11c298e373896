"""Streaming detectors: pure functions of a series stream, no I/O.

A detector is anything with ``update(step, values, rank) -> list[AlertEvent]``: it is fed each
record's values in arrival order and returns the alert transitions (firing or resolved) that the
record causes. ``update_columns(steps, series, rank)`` returns the same transitions for a whole
batch at once, a series at a time, which is how the collector runs it. The collector runs the same
code for every run; a trainer may run it in-process.
"""
from __future__ import annotations

from .base import AlertEvent, Detector, SeriesColumns
from .nonfinite import NonFiniteDetector

__all__ = ["AlertEvent", "Detector", "NonFiniteDetector", "SeriesColumns", "default_detectors"]


def default_detectors() -> list[Detector]:
    return [NonFiniteDetector()]

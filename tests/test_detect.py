"""Streaming detectors on synthetic streams."""
from __future__ import annotations

import math

from optiscope.detect import NonFiniteDetector, default_detectors


def test_non_finite_fires_once_per_incident_and_resolves():
    d = NonFiniteDetector()
    assert d.update(0, {"loss": 1.0, "grad_norm": 2.0}) == []
    (ev,) = d.update(1, {"loss": math.nan, "grad_norm": 2.0})
    assert (ev.rule, ev.state, ev.series, ev.step, ev.severity) == ("non_finite", "firing", "loss", 1, "page")
    assert math.isnan(ev.value) and "NaN" in ev.message
    assert d.update(2, {"loss": math.inf}) == []  # same incident: no storm
    (res,) = d.update(3, {"loss": 0.5})
    assert res.state == "resolved" and res.step == 3
    (inf,) = d.update(4, {"grad_norm": -math.inf}, rank=3)
    assert (inf.series, inf.rank) == ("grad_norm", 3) and "-Inf" in inf.message


def test_unwatched_series_and_ranks_are_independent():
    d = NonFiniteDetector()
    assert d.update(0, {"other": math.nan}) == []
    assert len(d.update(0, {"loss": math.nan}, rank=0)) == 1
    assert len(d.update(0, {"loss": math.nan}, rank=1)) == 1
    restored = NonFiniteDetector(firing=[(0, "loss")])  # the collector restores state from its store
    assert restored.update(5, {"loss": math.nan}) == []


def test_default_detectors():
    assert [type(d).__name__ for d in default_detectors()] == ["NonFiniteDetector"]

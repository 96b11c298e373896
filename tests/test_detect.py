"""Streaming detectors on synthetic streams."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from optiscope.detect import NonFiniteDetector, default_detectors

special = st.sampled_from([1.0, -2.5, 0.0, math.nan, math.inf, -math.inf])


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
    names = [type(d).__name__ for d in default_detectors()]
    assert names[0] == "NonFiniteDetector" and {
        "OverflowForecast",
        "LrAboveSchedule",
        "EarlyDivergence",
        "LossRegression",
        "LrOffSchedule",
    } <= set(names)
    paging = [d for d in default_detectors({"lr": 1e-3}) if getattr(d, "severity", "page") == "page"]
    warning = [d for d in default_detectors({"lr": 1e-3}) if getattr(d, "severity", "page") == "warning"]
    assert paging and warning and all(d.rule for d in paging + warning)


@given(
    st.lists(st.lists(st.tuples(st.sampled_from(["loss", "grad_norm", "lr"]), special), max_size=4), max_size=30),
    st.sets(st.tuples(st.integers(0, 1), st.sampled_from(["loss", "grad_norm"]))),
    st.integers(0, 3),
)
def test_columnar_entry_point_gives_the_same_events_as_record_by_record(stream, firing, rank):
    """The collector feeds whole series at once; the transitions, their order and the state after
    the batch are exactly those of feeding the records one by one."""
    records = [dict(r) for r in stream]
    one, cols = NonFiniteDetector(firing=firing), NonFiniteDetector(firing=firing)
    expected = [ev for i, values in enumerate(records) for ev in one.update(100 + i, values, rank)]
    steps = np.arange(100, 100 + len(records))
    series = {}
    for name in ("loss", "grad_norm", "lr"):
        idx = [i for i, r in enumerate(records) if name in r]
        if idx:
            series[name] = (np.array(idx), np.array([records[i][name] for i in idx]))
    got = cols.update_columns(steps, series, rank)
    assert [(e.state, e.series, e.step, e.rank, e.message) for e in got] == [
        (e.state, e.series, e.step, e.rank, e.message) for e in expected
    ]
    assert cols.firing == one.firing


def test_columnar_storm_is_one_incident():
    d = NonFiniteDetector()
    values = np.array([1.0, math.nan, math.inf, -math.inf, 2.0, 3.0, math.nan])
    got = d.update_columns(np.arange(7), {"loss": (np.arange(7), values)})
    assert [(e.state, e.step) for e in got] == [("firing", 1), ("resolved", 4), ("firing", 6)]
    assert d.firing == {(0, "loss")}
    assert d.update_columns(np.arange(7, 9), {"loss": (np.arange(2), np.array([math.nan, math.nan]))}) == []

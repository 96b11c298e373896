"""The paging rules (detect/rules.py) and the warning rules (detect/warnings.py) on synthetic
streams: each fires once where it should, stays quiet on the matching healthy stream, resolves,
keeps ranks apart and honours declared changes; and for every detector the columnar entry point
gives exactly the events of feeding the records one by one.

Every scenario goes through ``feed``, which runs both entry points (the columnar one in uneven
batches, series in another order than the records') and asserts they agree, so each test of a
rule's behaviour is also a test of that equivalence on a stream where the rule does something.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optiscope.detect import NonFiniteDetector, default_detectors
from optiscope.detect.rules import EarlyDivergence, LossRegression, LrAboveSchedule, LrOffSchedule, OverflowForecast
from optiscope.detect.schedule import declared_schedule
from optiscope.detect.warnings import EpsHeadroomCollapse, UpdateBimodality, UpdateRatioOutlier, VUnderestimationBurst
from optiscope.wire import DECLARE_DATA, DECLARE_SCHEDULE

Record = tuple  # (step, {series: value}, rank)


# -- the two entry points ---------------------------------------------------------------------------


def key(ev) -> tuple:
    """Everything an event says, NaN-safe (repr), evidence included (AlertEvent's == leaves it out)."""
    return (
        ev.rule,
        ev.severity,
        ev.state,
        ev.series,
        ev.step,
        ev.rank,
        repr(float(ev.value)),
        ev.message,
        repr(sorted(ev.evidence.items())),
    )


def by_record(det, records: list[Record]) -> list:
    return [ev for step, values, rank in records for ev in det.update(step, values, rank)]


def columnar(det, records: list[Record], cuts=(7, 1, 30, 3, 200)) -> list:
    """Batches as the collector gets them: one rank each, of uneven sizes (``cuts`` cycled); the
    series in reverse name order, not the records' order."""
    out, i, c = [], 0, 0
    while i < len(records):
        rank, n = records[i][2], cuts[c % len(cuts)]
        c += 1
        batch = []
        while i < len(records) and len(batch) < n and records[i][2] == rank:
            batch.append(records[i])
            i += 1
        names = sorted({k for _, v, _ in batch for k in v}, reverse=True)
        series = {}
        for name in names:
            idx = [j for j, (_, v, _) in enumerate(batch) if name in v]
            series[name] = (np.array(idx, dtype=np.int64), np.array([batch[j][1][name] for j in idx], dtype=np.float64))
        out += det.update_columns(np.array([s for s, _, _ in batch], dtype=np.int64), series, rank)
    return out


def feed(make: Callable, records: list[Record], cuts=(7, 1, 30, 3, 200)) -> list:
    """The events of ``records`` through ``update``, after checking that ``update_columns`` gives
    the same events, in the same order, and leaves the same incidents open."""
    one, two = make(), make()
    expected = by_record(one, records)
    got = columnar(two, records, cuts)
    assert [key(e) for e in got] == [key(e) for e in expected]
    assert two.firing == one.firing
    return expected


def recs(rows, rank: int = 0) -> list[Record]:
    return [(int(s), v, rank) for s, v in rows]


def transitions(events) -> list[tuple]:
    return [(e.state, e.step, e.rank, e.series) for e in events]


# -- synthetic streams ------------------------------------------------------------------------------

N = 900


def loss_curve(seed: int = 0, n: int = N, noise: float = 0.05) -> np.ndarray:
    """A healthy run: 5 -> 1 with step-to-step noise."""
    rng = np.random.default_rng(seed)
    return 1 + 4 * np.exp(-np.arange(n) / 100) + noise * rng.standard_normal(n)


def regressing(seed: int = 0, start: int = 400, rate: float = 0.01) -> np.ndarray:
    loss = loss_curve(seed)
    loss[start:] += rate * np.arange(N - start)
    return loss


def grad_curve(seed: int = 1, n: int = N) -> np.ndarray:
    return 1 + 0.1 * np.random.default_rng(seed).standard_normal(n)


def losses(loss, **more) -> list[Record]:
    return recs((s, {"loss": float(x), **{k: float(v[s]) for k, v in more.items()}}) for s, x in enumerate(loss))


PEAK = 1e-3
COSINE = {"lr": PEAK, "warmup_steps": 100, "total_steps": 1000, "schedule": "linear_warmup_cosine", "lr_min": 1e-5}


def cosine_lr(s: int, w: int = 100, total: int = 1000, lo: float = 1e-5) -> float:
    """torch/HF convention: warmup over (s + 1) / W, cosine over total - warmup."""
    if s < w:
        return PEAK * (s + 1) / w
    return lo + (PEAK - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - w) / (total - w))))


def headroom(seed: int = 3, fall_from: int | None = 200, n: int = 400) -> list[Record]:
    h = 20 + 0.2 * np.random.default_rng(seed).standard_normal(n)
    if fall_from is not None:
        h[fall_from:] -= 0.15 * np.arange(n - fall_from)
    return recs((s, {"act_headroom_bits": float(x)}) for s, x in enumerate(h))


def sampled(name: str, values, every: int = 100, first: int = 0, **also) -> list[Record]:
    """A sampled series: one point every ``every`` optimizer steps."""
    return recs(
        (first + i * every, {name: float(v), **{k: float(a[i]) for k, a in also.items()}}) for i, v in enumerate(values)
    )


def lognormal(seed: int, n: int = 40, level: float = 1.0, sigma: float = 0.15) -> np.ndarray:
    return level * np.exp(sigma * np.random.default_rng(seed).standard_normal(n))


def v_under(burst=(20, 21), value: float = 6.0, seed: int = 5) -> list[Record]:
    v = lognormal(seed)
    for i in burst:
        v[i] = value
    return sampled("v_underestimation", v)


def bimodality(burst=(25, 26), value: float = 0.3, seed: int = 6) -> np.ndarray:
    """The first steps are sign-like (at t = 1, u = g / |g|) and fall to a small level."""
    b = np.concatenate([[1.0, 0.6, 0.3, 0.1, 0.03], lognormal(seed, 35, 0.004, 0.3)])
    for i in burst:
        b[i] = value
    return b


def ratios(seed: int = 7, n: int = 40, outlier: str | None = "b", at=(20, 21), factor: float = 20.0) -> list[Record]:
    """Three tensors with their own update-ratio levels, sampled every 100 steps; also the global
    ``update_ratio``, which the per-tensor rule must ignore."""
    rng = np.random.default_rng(seed)
    levels = {"a": 2e-3, "b": 5e-3, "c": 1.5e-2}
    rows = []
    for i in range(n):
        v = {f"update_ratio/param/{t}": lv * math.exp(0.2 * rng.standard_normal()) for t, lv in levels.items()}
        if outlier and i in at:
            v[f"update_ratio/param/{outlier}"] *= factor
        v["update_ratio"] = 100.0 if i in at else 3e-3
        rows.append((i * 100, v))
    return recs(rows)


def eps(low=(20, 21, 22, 23), grad: float = 0.3, n: int = 40, seed: int = 8, h_low: float = 0.2) -> list[Record]:
    """Tensor ``w`` falls to eps scale on the samples ``low``; ``v`` stays at 3 decades."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rows.append(
            (
                i * 100,
                {
                    "eps_headroom/param/w": h_low if i in low else 2.5 + 0.1 * rng.standard_normal(),
                    "grad_norm/param/w": grad,
                    "eps_headroom/param/v": 3.0 + 0.1 * rng.standard_normal(),
                    "grad_norm/param/v": 1.0,
                },
            )
        )
    return recs(rows)


# name: (detector factory, stream that fires, (first, last) step it may fire at, series, evidence keys, healthy twin)
SCENARIOS = {
    "loss_regression": (
        LossRegression,
        lambda: losses(regressing()),
        (480, 700),
        "loss",
        {"window", "gave_back", "smoothed_loss", "best_smoothed_loss", "baseline_loss"},
        lambda: losses(loss_curve()),
    ),
    "lr_off_schedule": (
        lambda: LrOffSchedule(COSINE),
        lambda: recs((s, {"lr": PEAK if s >= 300 else cosine_lr(s)}) for s in range(1200)),
        (400, 520),
        "lr",
        {"window", "ratio", "declared"},
        lambda: recs((s, {"lr": cosine_lr(s)}) for s in range(1200)),
    ),
    "lr_above_schedule": (
        lambda: LrAboveSchedule({"lr": PEAK}),
        lambda: losses(regressing(), lr=np.where(np.arange(N) >= 400, 3 * PEAK, PEAK)),
        (410, 600),
        "lr",
        {"window", "ratio", "gave_back", "smoothed_loss"},
        lambda: losses(loss_curve(), lr=np.where(np.arange(N) >= 400, 3 * PEAK, PEAK)),
    ),
    # the ceiling is reached at step 333: paged within the 50-step horizon, once within 3 bits of it
    "activation_overflow": (
        OverflowForecast,
        headroom,
        (283, 320),
        "act_headroom_bits",
        {"window", "headroom_bits", "bits_per_step", "steps_to_ceiling"},
        lambda: headroom(fall_from=None),
    ),
    "early_divergence": (
        EarlyDivergence,
        lambda: losses(
            regressing(start=500, rate=0.05), grad_norm=grad_curve() * np.r_[np.ones(500), np.linspace(1, 5, 400)]
        ),
        (510, 640),
        "loss",
        {"window", "gave_back", "grad_norm_median", "grad_norm_baseline"},
        lambda: losses(loss_curve(), grad_norm=grad_curve()),
    ),
    "v_underestimation": (
        VUnderestimationBurst,
        v_under,
        (2100, 2100),
        "v_underestimation",
        {"window", "values", "baseline", "threshold"},
        lambda: v_under(burst=()),
    ),
    "update_bimodality": (
        UpdateBimodality,
        lambda: sampled("update_bimodality", bimodality()),
        (2600, 2600),
        "update_bimodality",
        {"window", "values", "baseline", "threshold"},
        lambda: sampled("update_bimodality", bimodality(burst=())),
    ),
    "update_ratio_outlier": (
        UpdateRatioOutlier,
        ratios,
        (2100, 2100),
        "update_ratio/param/b",
        {"window", "values", "baseline", "threshold"},
        lambda: ratios(outlier=None),
    ),
    "eps_headroom_collapse": (
        EpsHeadroomCollapse,
        eps,
        (2100, 2100),
        "eps_headroom/param/w",
        {"window", "values", "baseline", "threshold", "grad_norm"},
        lambda: eps(low=()),
    ),
    "non_finite": (
        NonFiniteDetector,
        lambda: losses(np.where(np.arange(N) == 300, np.nan, loss_curve())),
        (300, 300),
        "loss",
        set(),
        lambda: losses(loss_curve()),
    ),
}
WARNINGS = {
    "lr_off_schedule",
    "v_underestimation",
    "update_bimodality",
    "update_ratio_outlier",
    "eps_headroom_collapse",
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_fires_once_with_evidence(name):
    make, stream, (lo, hi), series, keys, _ = SCENARIOS[name]
    events = feed(make, stream())
    firing = [e for e in events if e.state == "firing"]
    assert len(firing) == 1, transitions(events)
    (ev,) = firing
    assert (ev.rule, ev.series, ev.rank) == (name, series, 0)
    assert ev.severity == ("warning" if name in WARNINGS else "page")
    assert lo <= ev.step <= hi, ev.step
    assert keys <= set(ev.evidence), sorted(ev.evidence)
    if "window" in keys:
        first, last = ev.evidence["window"]
        assert first <= last == ev.step
    assert f"step {ev.step}" in ev.message
    assert "\n" not in ev.message and ". " not in ev.message  # one sentence


def _recovery(name: str, rows: list[Record]) -> list[tuple]:
    """What follows a scenario's stream for its incident to resolve, as (step, values)."""
    end = rows[-1][0]
    if name in ("loss_regression", "lr_above_schedule", "early_divergence"):  # back to the best loss, LR on schedule
        last = rows[-1][1]
        return [
            (end + 1 + i, {**last, "loss": 1.0 + 0.05 * math.sin(i), **({"lr": PEAK} if "lr" in last else {})})
            for i in range(300)
        ]
    if name == "activation_overflow":
        return [(end + 1 + i, {"act_headroom_bits": 20.0 + 0.1 * math.sin(i)}) for i in range(120)]
    if name == "lr_off_schedule":
        return [(s, {"lr": cosine_lr(s)}) for s in range(end + 1, end + 20)]
    return [(s + end + 100, v) for s, v, _ in SCENARIOS[name][5]()[-15:]]  # the healthy twin's last points


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_messages_name_step_and_rank(name):
    """The scenario on rank 3, then its recovery: both transitions' messages name step and rank."""
    make, stream, *_ = SCENARIOS[name]
    rows = stream()
    events = feed(make, [(s, v, 3) for s, v, _ in rows] + [(s, v, 3) for s, v in _recovery(name, rows)])
    assert [e.state for e in events] == ["firing", "resolved"], transitions(events)
    for e in events:
        assert f"step {e.step}" in e.message and "rank 3" in e.message, e.message


@pytest.mark.parametrize("name", SCENARIOS)
def test_quiet_on_the_healthy_twin(name):
    make, *_, healthy = SCENARIOS[name]
    assert feed(make, healthy()) == []


@pytest.mark.parametrize("name", SCENARIOS)
def test_ranks_are_independent(name):
    """Rank 0 has the incident and rank 1 the healthy stream, interleaved: rank 0's events are
    those it has alone, rank 1 has none. Then both have it, rank 1 a hundred records behind."""
    make, stream, *_, healthy = SCENARIOS[name]
    bad, good = stream(), [(s, v, 1) for s, v, _ in healthy()]
    alone = feed(make, bad)
    mixed = feed(make, [r for pair in zip(bad, good) for r in pair] + bad[len(good) :] + good[len(bad) :])
    assert alone and [key(e) for e in mixed] == [key(e) for e in alone]
    lag = min(100, len(bad) // 4)
    behind = [(s, v, 1) for s, v, _ in bad]
    both = feed(make, bad[:lag] + [r for pair in zip(behind, bad[lag:]) for r in pair] + behind[len(bad) - lag :])
    assert [key(e) for e in both if e.rank == 0] == [key(e) for e in alone]
    assert [(e.state, e.step, e.series) for e in both if e.rank == 1] == [(e.state, e.step, e.series) for e in alone]


def test_restored_incident_does_not_fire_again():
    """The collector restores open incidents; the rule then resolves them, never fires twice."""
    ev = feed(lambda: VUnderestimationBurst(firing=[(0, "v_underestimation")]), v_under(burst=()))
    assert [e.state for e in ev] == ["resolved"] and ev[0].step == 600  # 5 samples of baseline, then 2 below


def _incident(name: str) -> tuple[list[Record], int, list]:
    """A scenario's stream and recovery on rank 0, the index of the record that fires, and the
    events of the whole stream (firing, then resolved)."""
    make, stream, *_ = SCENARIOS[name]
    rows = stream()
    rows += [(s, v, 0) for s, v in _recovery(name, rows)]
    det, cut = make(), None
    for i, (s, v, r) in enumerate(rows):
        if any(e.state == "firing" for e in det.update(s, v, r)):
            cut = i
            break
    events = by_record(make(), rows)
    assert cut is not None and [e.state for e in events] == ["firing", "resolved"], transitions(events)
    return rows, cut, events


@pytest.mark.parametrize("entry", [by_record, columnar])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_restore_firing_replaces_the_open_incidents_of_a_rank(name, entry):
    """As the collector does after catching a detector up: fed the records before the incident
    silently, then told by ``restore_firing`` what the alerts table has. Restored as firing, the
    incident does not fire again and resolves where it would have; restored as not firing (over a
    stale belief that it was), it fires where it would have. Other ranks' incidents are kept."""
    make, _, _, series, *_ = SCENARIOS[name]
    rows, cut, events = _incident(name)

    another_replica_fired = make()
    by_record(another_replica_fired, rows[:cut])
    another_replica_fired.restore_firing(1, ["other"])
    another_replica_fired.restore_firing(0, [series])
    after = entry(another_replica_fired, rows[cut:])
    assert [key(e) for e in after] == [key(e) for e in events[1:]]  # the resolution only
    assert another_replica_fired.firing == {(1, "other")}

    stale = make()
    stale.restore_firing(0, [series, "other"])  # believed open, but the alerts table has it resolved
    by_record(stale, rows[:cut])
    stale.restore_firing(0, [])
    assert [key(e) for e in entry(stale, rows[cut:])] == [key(e) for e in events]


def test_needs_are_the_replayed_series_and_prefix_rules_keep_per_tensor_series_out():
    """The collector replays the union of ``needs`` after a restart: the per-tensor series that
    prefix rules read (``needs_prefixes``) are not in it."""
    dets = default_detectors({"lr": 1e-3})
    assert {n for d in dets for n in d.needs} == {
        "loss",
        "grad_norm",
        "lr",
        "act_headroom_bits",
        DECLARE_DATA,
        DECLARE_SCHEDULE,
        "v_underestimation",
        "update_bimodality",
        "eps_headroom",
    }
    prefixed = {type(d).__name__: d.needs_prefixes for d in dets if d.needs_prefixes}
    assert prefixed == {
        "UpdateRatioOutlier": ("update_ratio/param/",),
        "EpsHeadroomCollapse": ("eps_headroom/param/", "grad_norm/param/"),
    }
    assert all(d.rule and d.severity in ("page", "warning") for d in dets)


# -- the loss rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_regression_ignores_noise_and_a_one_step_spike(seed):
    loss = loss_curve(seed, noise=0.1)
    loss[500] *= 100  # one corrupted batch
    loss[600:603] *= 3  # a few bad batches
    assert feed(LossRegression, losses(loss)) == []
    assert feed(lambda: EarlyDivergence(), losses(loss, grad_norm=grad_curve(seed))) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_plateau_is_no_regression(seed):
    """A run that learns nothing: no progress stands out of the noise, so there is none to give
    back, whatever the noise does."""
    loss = 2 + 0.1 * np.random.default_rng(seed).standard_normal(N)
    assert feed(LossRegression, losses(loss)) == []
    assert feed(lambda: LrAboveSchedule({"lr": PEAK}), losses(loss, lr=np.full(N, 3 * PEAK))) == []


@pytest.mark.parametrize("seed", range(40))
def test_slow_progress_within_the_noise_is_no_regression(seed):
    """A loss improving about as much as its noise over the run: the best running median is a noise
    excursion, so its wobble must not read as progress given back (with a margin of 3 MADs, 11 of
    these 40 seeds paged)."""
    slow = 2 - 2e-4 * np.arange(N) + 0.1 * np.random.default_rng(seed).standard_normal(N)
    assert feed(LossRegression, losses(slow)) == []


def test_a_shock_that_heals_is_not_paged():
    """One corrupted batch (100x the loss) knocks the run back, and it learns its way back."""
    loss, gn = loss_curve(), grad_curve()
    loss[500] *= 100
    loss[501:600] += 2.5 * np.exp(-np.arange(99) / 30)
    gn[500:540] *= 3
    assert feed(LossRegression, losses(loss)) == []
    assert feed(EarlyDivergence, losses(loss, grad_norm=gn)) == []
    loss[600:] += 2.5  # it does not heal: the knock-back stays, and LossRegression pages
    assert [e.state for e in feed(LossRegression, losses(loss))] == ["firing"]


def test_loss_regression_a_loss_near_zero_that_doubles_is_not_a_regression():
    rng = np.random.default_rng(4)
    loss = np.maximum(1e-3, np.exp(-np.arange(N) / 50)) * (1 + 0.05 * rng.standard_normal(N))
    loss[500:] *= 2  # 0.001 -> 0.002: a tenth of a percent of the progress
    assert feed(LossRegression, losses(loss)) == []
    loss[500:] *= 300  # 0.6: more than half of it
    assert [e.state for e in feed(LossRegression, losses(loss))] == ["firing"]


def test_loss_regression_resolves_once_recovered():
    loss = loss_curve()
    loss[400:600] += 0.01 * np.arange(200)
    loss[600:800] += 2 - 0.01 * np.arange(200)
    ev = feed(LossRegression, losses(loss))
    assert [e.state for e in ev] == ["firing", "resolved"]
    assert 700 <= ev[1].step <= 800 and "rank 0" in ev[1].message


def _data_switch() -> np.ndarray:
    """New, harder data at step 400: the loss jumps most of the way back and heals slowly."""
    loss = loss_curve()
    loss[400:] += 3 * np.exp(-np.arange(N - 400) / 300)
    return loss


@pytest.mark.parametrize("make", [LossRegression, EarlyDivergence])
def test_a_declared_data_change_is_not_a_regression(make):
    loss, gn = _data_switch(), grad_curve()
    gn[400:450] *= 3  # the gradient follows the new data
    rows = losses(loss, grad_norm=gn)
    undeclared = feed(make, rows)
    if make is LossRegression:  # the witness: the same stream undeclared does page
        assert [e.state for e in undeclared][:1] == ["firing"]
    assert feed(lambda: make({"data_mixture_switch_steps": [400]}), rows) == []
    declared = rows[:400] + [(400, {DECLARE_DATA: 1.0}, 0)] + rows[400:]  # its own record, as Run.declare sends it
    assert feed(make, declared) == []
    assert feed(lambda: make({"data_mixture_switch_steps": [800]}), rows)[:1] == undeclared[:1]  # not yet due


def test_lr_above_schedule_needs_both_the_lr_and_the_loss():
    hi = np.where(np.arange(N) >= 400, 3 * PEAK, PEAK)
    make = lambda: LrAboveSchedule({"lr": PEAK})  # noqa: E731
    assert feed(make, losses(regressing(), lr=np.full(N, PEAK))) == []  # LossRegression's job
    jump = loss_curve()
    jump[450:] += 3  # a loss that jumps with the LR up: paged on the two-step test, soon after
    (ev,) = feed(make, losses(jump, lr=hi))
    assert 450 <= ev.step <= 460
    fixed = regressing()
    fixed[500:] = 1.0 + 0.03 * np.sin(np.arange(N - 500))
    ev = feed(make, losses(fixed, lr=np.where((np.arange(N) >= 400) & (np.arange(N) < 500), 3 * PEAK, PEAK)))
    assert [e.state for e in ev] == ["firing", "resolved"] and ev[1].step >= 500


# -- the LR schedule ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, lr",
    [
        ({"lr": PEAK}, lambda s: PEAK),
        ({"lr": PEAK, "schedule": "constant"}, lambda s: PEAK),
        ({"lr": PEAK, "warmup_steps": 100}, lambda s: PEAK * min(1.0, (s + 1) / 100)),
        ({"lr": PEAK, "warmup_steps": 100, "schedule": "linear_warmup_constant"}, lambda s: PEAK * min(1.0, s / 100)),
        (COSINE, cosine_lr),
        (COSINE, lambda s: 1e-5 + (PEAK - 1e-5) * min(s / 100, 0.5 * (1 + math.cos(math.pi * min(1.0, s / 1000))))),
        ({"lr": PEAK, "schedule": "mystery"}, lambda s: PEAK * (1 + math.sin(s / 50)) / 2),
    ],
)
def test_a_run_on_its_declared_schedule_is_never_above_the_envelope(config, lr):
    env = declared_schedule(config)
    assert all(lr(s) <= env(s) * (1 + 1e-12) for s in range(1500))
    assert feed(lambda: LrOffSchedule(config), recs((s, {"lr": lr(s)}) for s in range(1500))) == []


def test_the_envelope_is_tight_enough_to_catch_a_skipped_warmup_and_a_lost_decay():
    warm = {"lr": PEAK, "warmup_steps": 100}
    assert declared_schedule(warm)(10) == pytest.approx(PEAK * 12 / 100)
    ev, back = feed(lambda: LrOffSchedule(warm), recs((s, {"lr": PEAK}) for s in range(100)))
    assert ev.step == 2 and ev.evidence["ratio"] >= 1.5  # peak LR from step 0: a skipped warmup
    assert back.state == "resolved" and 80 <= back.step < 100  # the schedule caught up with it
    env = declared_schedule(COSINE)
    assert env(550) == pytest.approx(1e-5 + (PEAK - 1e-5) * 0.5)  # the more generous of the conventions
    assert env(999) == pytest.approx(1e-5, rel=1e-3) and env(5000) == 1e-5
    assert declared_schedule({"lr": PEAK, "schedule": "mystery", "warmup_steps": 100})(0) == PEAK
    assert declared_schedule({}) is None and declared_schedule({"lr": 0.0}) is None
    assert feed(lambda: LrOffSchedule({}), recs((s, {"lr": 5.0}) for s in range(50))) == []  # nothing declared


def test_lr_off_schedule_unknown_schedule_fires_only_above_the_peak():
    make = lambda: LrOffSchedule({"lr": PEAK, "schedule": "mystery"})  # noqa: E731
    assert feed(make, recs((s, {"lr": 1.4 * PEAK}) for s in range(100))) == []
    lr = [2 * PEAK if 50 <= s < 60 else PEAK for s in range(100)]
    ev = feed(make, recs((s, {"lr": lr[s]}) for s in range(100)))
    assert transitions(ev) == [("firing", 52, 0, "lr"), ("resolved", 62, 0, "lr")]
    one = [3 * PEAK if s in (50, 70) else PEAK for s in range(100)]  # glitches of one step
    assert feed(make, recs((s, {"lr": one[s]}) for s in range(100))) == []


def test_a_declared_schedule_change_in_the_lr_record_is_the_new_reference():
    lr = [PEAK if s < 50 else 3 * PEAK for s in range(100)]
    rows = recs((s, {"lr": lr[s], **({DECLARE_SCHEDULE: 1.0} if s == 50 else {})}) for s in range(100))
    assert feed(lambda: LrOffSchedule({"lr": PEAK}), rows) == []
    undeclared = recs((s, {"lr": lr[s]}) for s in range(100))
    assert [e.step for e in feed(lambda: LrOffSchedule({"lr": PEAK}), undeclared)] == [52]


def test_a_declared_schedule_change_in_its_own_record_is_the_new_reference():
    """As Run.declare sends it: a record of its own, after the step's LR (the change at 150
    declared after step 149 or after step 150); the next LR seen is the new reference."""
    lrs = np.where(np.arange(300) < 150, PEAK, 3 * PEAK)
    rows = recs((s, {"lr": float(lr)}) for s, lr in enumerate(lrs))
    loss = losses(regressing(start=150, rate=0.02)[:300], lr=lrs)  # the loss regresses from the change on
    assert [e.state for e in feed(lambda: LrAboveSchedule({"lr": PEAK}), loss)] == ["firing"]  # undeclared: paged
    for at in (149, 150):
        mark = [(at, {DECLARE_SCHEDULE: 1.0}, 0)]
        assert feed(lambda: LrOffSchedule({"lr": PEAK}), rows[: at + 1] + mark + rows[at + 1 :]) == []
        assert feed(lambda: LrAboveSchedule({"lr": PEAK}), loss[: at + 1] + mark + loss[at + 1 :]) == []
    early = rows[:140] + [(139, {DECLARE_SCHEDULE: 1.0}, 0)] + rows[140:]  # declared, then the LR still on schedule:
    assert [e.step for e in feed(lambda: LrOffSchedule({"lr": PEAK}), early)] == [152]  # that became the reference


def test_a_constant_schedule_ignores_warmup_steps():
    cfg = {"lr": PEAK, "schedule": "constant", "warmup_steps": 100}
    assert feed(lambda: LrOffSchedule(cfg), recs((s, {"lr": PEAK}) for s in range(100))) == []


# -- activation headroom -----------------------------------------------------------------------------


def test_overflow_pages_at_once_on_the_ceiling_and_ignores_nan():
    rows = headroom(fall_from=None)[:100]
    rows[60] = (60, {"act_headroom_bits": math.nan}, 0)
    assert feed(OverflowForecast, rows) == []
    rows[70] = (70, {"act_headroom_bits": -math.inf}, 0)
    ev = feed(OverflowForecast, rows)
    # an overflow pages at once; the next step is 20 bits under the ceiling again, a flat trend
    assert transitions(ev) == [("firing", 70, 0, "act_headroom_bits"), ("resolved", 71, 0, "act_headroom_bits")]
    assert ev[0].evidence["headroom_bits"] == "-Infinity" and math.isinf(ev[0].value)
    dip = headroom(fall_from=None)
    dip[150] = (150, {"act_headroom_bits": 2.0}, 0)  # one close call, then back at 20 bits
    assert feed(OverflowForecast, dip) == []


# -- the warning rules --------------------------------------------------------------------------------


def test_v_underestimation_needs_consecutive_samples_far_above_its_own_median():
    assert feed(VUnderestimationBurst, v_under(burst=(20,), value=50.0)) == []  # one sample
    assert feed(VUnderestimationBurst, v_under(burst=(20, 22, 24), value=50.0)) == []  # never two in a row
    assert feed(VUnderestimationBurst, v_under(burst=(20, 21), value=3.5)) == []  # 3.5x: not 4x
    heavy = lognormal(9, level=2.5)  # heavy-tailed gradients hold this run at 2.5
    heavy[20:22] = 7.0  # 2.8x its median: not a burst here, though 7 would be one at a median of 1
    assert feed(VUnderestimationBurst, sampled("v_underestimation", heavy)) == []
    low = lognormal(10, level=0.5)
    low[20:22] = 2.9  # 5.8x its median, but below 3: Adam's normalizer is not lagging by much
    assert feed(VUnderestimationBurst, sampled("v_underestimation", low)) == []
    heavy[20:22] = 12.0
    ev, back = feed(VUnderestimationBurst, sampled("v_underestimation", heavy))
    assert (ev.state, back.state, back.step) == ("firing", "resolved", 2300)
    assert ev.evidence["values"] == [12.0, 12.0] and ev.evidence["window"] == [2000, 2100]
    assert ev.evidence["threshold"] == pytest.approx(4 * ev.evidence["baseline"], rel=1e-5)
    assert 2.2 < ev.evidence["baseline"] < 2.8 and ev.evidence["ratio"] > 4


def test_v_underestimation_resolves_with_hysteresis_and_nan_does_not_break_it():
    v = lognormal(5)
    v[20:30] = [6, 6, 3, 3, 3, 1.9, math.nan, 1.0, 6, 1.0]
    ev = feed(VUnderestimationBurst, sampled("v_underestimation", v))
    # 3 (between the lines) holds the incident; 1.9, NaN (no reading), 1.0 resolve it; one 6 is no new one
    assert transitions(ev) == [("firing", 2100, 0, "v_underestimation"), ("resolved", 2700, 0, "v_underestimation")]
    v[30:34] = [math.inf, 8, math.nan, 8]
    ev = feed(VUnderestimationBurst, sampled("v_underestimation", v))
    # Inf and NaN are no readings: they neither break the streak nor build the baseline
    assert [(e.state, e.step) for e in ev][2:] == [("firing", 3300), ("resolved", 3500)]


def test_v_underestimation_declared_data_change_restarts_the_baseline():
    rows = v_under()
    assert feed(lambda: VUnderestimationBurst({"data_mixture_switch_steps": [2000]}), rows) == []
    declared = rows[:20] + [(2000, {DECLARE_DATA: 1.0}, 0)] + rows[20:]
    assert feed(VUnderestimationBurst, declared) == []
    assert len(feed(lambda: VUnderestimationBurst({"data_mixture_switch_steps": [3500]}), rows)) == 2  # fires, resolves
    again = v_under(burst=(20, 21, 30, 31))  # a burst once the new baseline has formed is an incident again
    ev = feed(lambda: VUnderestimationBurst({"data_mixture_switch_steps": [2000]}), again)
    assert [(e.state, e.step) for e in ev] == [("firing", 3100), ("resolved", 3300)]


def test_update_bimodality_start_of_run_is_sign_like_by_design():
    every_step = np.concatenate([np.linspace(1.0, 0.01, 60), lognormal(11, 200, 0.004, 0.3)])
    assert feed(UpdateBimodality, sampled("update_bimodality", every_step, every=1)) == []
    b = bimodality(burst=(25,))
    assert feed(UpdateBimodality, sampled("update_bimodality", b)) == []  # one sample
    b = bimodality(burst=(25, 26), value=0.08)  # 20x the median, but under a tenth of the coordinates
    assert feed(UpdateBimodality, sampled("update_bimodality", b)) == []
    b = bimodality(burst=(25, 26, 27, 28, 29), value=0.3)
    b[30:32] = 0.06  # below the firing line, above the 5% resolve floor: still the same incident
    b[32:34] = 0.004
    ev = feed(UpdateBimodality, sampled("update_bimodality", b))
    assert [(e.state, e.step) for e in ev] == [("firing", 2600), ("resolved", 3300)]
    assert "%" in ev[0].message and "rank 0" in ev[0].message


def test_update_ratio_outlier_per_tensor_and_bounded():
    ev, back = feed(UpdateRatioOutlier, ratios())
    assert (ev.state, back.state, back.series, back.step) == ("firing", "resolved", ev.series, 2300)
    assert ev.series == "update_ratio/param/b" and " b " in ev.message
    assert len(ev.evidence["values"]) == 2 and ev.evidence["values"][-1] == pytest.approx(ev.value, rel=1e-5)
    assert ev.evidence["ratio"] >= 10 and ev.evidence["window"] == [2000, 2100]
    assert feed(UpdateRatioOutlier, ratios(at=(20,))) == []  # one sample
    shifted = feed(UpdateRatioOutlier, ratios(at=range(20, 40)))  # a burst never becomes its own baseline
    assert [(e.state, e.step) for e in shifted] == [("firing", 2100)]
    assert feed(UpdateRatioOutlier, ratios(factor=5.0)) == []  # 5x: within what a tensor does
    rows = ratios(at=(2, 3))  # before 5 samples of baseline: no judgement
    assert feed(UpdateRatioOutlier, rows) == []

    class Small(UpdateRatioOutlier):
        MAX_TRACKED = 2  # "a" and "b" are tracked (names in order), "c" never is

    assert feed(Small, ratios(outlier="c")) == []
    assert len(feed(Small, ratios(outlier="b"))) == 2
    zero = recs((i * 100, {"update_ratio/param/z": 0.0 if i < 10 else 5e-4}) for i in range(20))
    assert feed(UpdateRatioOutlier, zero) == []  # from an LR of 0: tiny steps, whatever the baseline


def test_update_ratio_linear_warmup_sampled_every_step_is_not_an_outlier():
    rng = np.random.default_rng(12)
    rows = recs(
        (s, {"update_ratio/param/w": 1e-2 * (s + 1) / 500 * math.exp(0.1 * rng.standard_normal())}) for s in range(500)
    )
    assert feed(UpdateRatioOutlier, rows) == []


def test_update_ratio_declared_schedule_change_restarts_the_baselines():
    rows = ratios(outlier=None)
    lifted = [
        (s, {k: v * (20 if s >= 2000 and k.startswith("update_ratio/") else 1) for k, v in vals.items()}, r)
        for s, vals, r in rows
    ]  # the LR raised 20x at step 2000: every tensor follows
    assert {e.series for e in feed(UpdateRatioOutlier, lifted) if e.state == "firing"} == {
        "update_ratio/param/a",
        "update_ratio/param/b",
        "update_ratio/param/c",
    }
    declared = lifted[:20] + [(2000, {DECLARE_SCHEDULE: 1.0}, 0)] + lifted[20:]
    assert feed(UpdateRatioOutlier, declared) == []
    assert feed(lambda: UpdateRatioOutlier({"data_mixture_switch_steps": [1950]}), lifted) == []


def test_eps_headroom_collapse_needs_a_gradient_and_resolves_with_hysteresis():
    assert feed(EpsHeadroomCollapse, eps(grad=0.0)) == []  # no gradient: v decays by design
    assert feed(EpsHeadroomCollapse, eps(low=(20,))) == []  # one sample
    assert feed(EpsHeadroomCollapse, eps(h_low=0.6)) == []  # eps is 20% of the denominator: not yet
    rows = eps(low=tuple(range(20, 40)))
    rows = [
        (s, {k: v for k, v in vals.items() if not k.startswith("grad_norm/") or s < 1000}, r) for s, vals, r in rows
    ]  # grad_norm/param missing later (clipping appeared): the last one holds
    (ev,) = feed(EpsHeadroomCollapse, rows)
    assert ev.step == 2100 and ev.evidence["grad_norm"] == 0.3 and ev.evidence["values"] == [0.2, 0.2]
    assert ev.evidence["threshold"] == 0.5 and 2.2 < ev.evidence["baseline"] < 2.8 and " w'" in ev.message
    h = [2.5] * 10 + [0.2, 0.2, 0.8, 0.8, 0.8, -math.inf, math.nan, 1.2, 0.3, 1.1, 2.5]
    ev = feed(EpsHeadroomCollapse, sampled("eps_headroom", h, grad_norm=[1.0] * len(h)))
    # 0.8 sits between the lines; -inf (a median of 0) and NaN are no readings; 1.2 then 0.3 is no resolve
    assert transitions(ev) == [("firing", 1100, 0, "eps_headroom"), ("resolved", 2000, 0, "eps_headroom")]
    assert "model's" in ev[0].message


# -- every detector: the columnar entry point is the record-by-record one ----------------------------

_CFG = {"lr": 1.0, "warmup_steps": 3, "data_mixture_switch_steps": [120, 125]}


def _with_config(cls) -> Callable:
    return lambda firing: cls(_CFG, firing)


DETECTORS = {  # every detector class, made with a config and the incidents the collector restored
    "NonFiniteDetector": lambda firing: NonFiniteDetector(firing=firing),
    **{
        cls.__name__: _with_config(cls)
        for cls in (
            OverflowForecast,
            LrAboveSchedule,
            EarlyDivergence,
            LossRegression,
            LrOffSchedule,
            VUnderestimationBurst,
            UpdateBimodality,
            UpdateRatioOutlier,
            EpsHeadroomCollapse,
        )
    },
}
NAMES = [
    "loss",
    "grad_norm",
    "lr",
    "act_headroom_bits",
    DECLARE_DATA,
    DECLARE_SCHEDULE,
    "v_underestimation",
    "update_bimodality",
    "update_ratio",
    "update_ratio/param/a",
    "update_ratio/param/b",
    "eps_headroom",
    "eps_headroom/param/a",
    "eps_headroom/param/b",
    "grad_norm/param/a",
    "grad_norm_clipped",
    "other",
]
VALUES = st.one_of(
    st.sampled_from([0.0, 1e-4, 0.2, 0.5, 1.0, 2.0, 5.0, 50.0, 1e6, -1.0, math.nan, math.inf, -math.inf]),
    st.floats(-10, 100),
)


@pytest.mark.parametrize("cls", DETECTORS)
@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),
            st.integers(0, 1),
            st.dictionaries(st.sampled_from(NAMES), VALUES, min_size=1, max_size=5),
        ),
        max_size=80,
    ),
    st.lists(st.integers(1, 40), min_size=1, max_size=5),
    st.sets(
        st.tuples(
            st.integers(0, 1),
            st.sampled_from(["loss", "lr", "v_underestimation", "update_ratio/param/a", "eps_headroom/param/a"]),
        )
    ),
)
def test_columns_equal_records_on_random_streams(cls, stream, cuts, firing):
    """Random series, values (NaN and +-Inf among them), ranks and step gaps, in random batches,
    from random restored incidents."""
    step, rows = 100, []
    for gap, rank, values in stream:
        step += gap
        rows.append((step, values, rank))
    feed(lambda: DETECTORS[cls](set(firing)), rows, tuple(cuts))


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(sorted(SCENARIOS)),
    st.sampled_from([0, 1]),
    st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from([math.nan, math.inf, -math.inf, 0.0])), max_size=6
    ),
    st.lists(st.integers(1, 300), min_size=1, max_size=4),
)
def test_columns_equal_records_on_scenarios_with_non_finite_points(name, twin, spoil, cuts):
    """The scenarios, where the rules fire and resolve, with points spoiled by NaN, +-Inf or 0."""
    make, stream, *_, healthy = SCENARIOS[name]
    rows = [(s, dict(v), r) for s, v, r in (healthy() if twin else stream())]
    for where, value in spoil:
        s, v, r = rows[int(where * len(rows))]
        v[sorted(v)[int(where * 1000) % len(v)]] = value
    feed(make, rows, tuple(cuts))


def test_spikes_that_come_back_are_instability_not_shocks():
    """One spike is an outlier batch and the run gets time to heal; a second one 30 steps later
    means the run is unstable: the damage that follows pages without waiting out the healing time."""
    loss = loss_curve()
    loss[500] *= 100
    loss[501:] += 2.5  # knocked back for good
    one = [e for e in feed(LossRegression, losses(loss)) if e.state == "firing"]
    loss[530] *= 100  # and it spikes again
    two = [e for e in feed(LossRegression, losses(loss)) if e.state == "firing"]
    assert one and two and two[0].step < one[0].step, (one, two)
    assert two[0].step <= 545
    # the same event's next losses (within 10 steps) are its aftermath, not a second spike
    loss2 = loss_curve()
    loss2[500] *= 100
    loss2[503] *= 40
    loss2[501:600] += 2.5 * np.exp(-np.arange(99) / 30)
    assert feed(LossRegression, losses(loss2)) == []


def test_two_bad_batches_in_a_row_are_not_a_collapse_unless_unprecedented():
    """A heavy-tailed loss has runs of bad batches; the fast path of EarlyDivergence needs the
    last two losses beyond every loss of the 200 steps before, with the gradient norm agreeing."""
    rng = np.random.default_rng(7)
    loss = loss_curve()
    heavy = rng.random(N) < 0.05
    loss[heavy] += 3.0  # one batch in 20 is much worse, sometimes two in a row
    loss[300:302] += 3.0
    gn = grad_curve()
    gn[heavy] *= 2
    gn[300:302] *= 2
    assert feed(EarlyDivergence, losses(loss, grad_norm=gn)) == []
    loss[600:] += 8.0  # a real collapse: far beyond anything seen before
    gn[600:] *= 3
    (ev,) = [e for e in feed(EarlyDivergence, losses(loss, grad_norm=gn)) if e.state == "firing"]
    assert 600 <= ev.step <= 602 and "last two losses" in ev.message


def test_eps_collapse_ignores_a_tensor_with_only_rounding_noise_for_a_gradient():
    """A conv bias ahead of BatchNorm: its gradient is zero up to rounding (1e-8 against a model
    gradient norm of 2), and its v sits at eps by design: no warning. The same headroom with a real
    gradient warns."""
    name = "eps_headroom/param/c1.bias"
    tiny = sampled(name, [0.3] * 6, **{"grad_norm/param/c1.bias": np.full(6, 1e-8), "grad_norm": np.full(6, 2.0)})
    assert feed(EpsHeadroomCollapse, tiny) == []
    real = sampled(name, [0.3] * 6, **{"grad_norm/param/c1.bias": np.full(6, 1e-3), "grad_norm": np.full(6, 2.0)})
    assert [e.state for e in feed(EpsHeadroomCollapse, real)] == ["firing"]


def test_a_config_number_beyond_float64_is_ignored_not_fatal():
    """A run's config is the user's JSON: 10**400 is valid there. The detectors built from it treat
    it as undeclared instead of failing every batch of the run."""
    from optiscope.detect.schedule import declared_steps

    huge = 10**400
    assert declared_schedule({"lr": huge}) is None
    assert declared_steps({"data_mixture_switch_steps": [huge, 5, True, math.nan]}, "data_mixture_switch_steps") == [5]
    for config in ({"lr": huge}, {"data_mixture_switch_steps": [huge]}, {"lr": 1e-3, "warmup_steps": huge}):
        for d in default_detectors(config):
            d.update(1, {"loss": 1.0, "lr": 1e-3, "grad_norm": 1.0})

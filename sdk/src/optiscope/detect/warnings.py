"""The warning rules that read Adam's sampled optimizer series.

These series arrive only on sampled steps (one optimizer step in 100 by default), so every rule
here counts *samples*, not steps: a condition must hold on ``SUSTAIN`` consecutive samples to
fire (one sample is one micro-batch, which Adam absorbs) and its opposite on ``SUSTAIN`` more to
resolve, with a gap between the two lines (hysteresis) so that a value hovering at the threshold
is one incident, not a storm. They never page: each is a mechanism that often precedes a loss
spike, not the spike itself, which the paging rules in ``rules.py`` watch.

Baselines are the series' own running median over its last ``BASELINE`` samples: the healthy
level of these series depends on the model, the data and the optimizer's betas, so a fixed
number would be wrong for most runs, and a median moves by one rank, not by its size, when one
outlier enters it. A sample that crosses the firing line does not enter the baseline (a burst
would otherwise raise the bar it is judged against); a declared change restarts it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from statistics import median
from typing import Any

from ..wire import DECLARE_DATA, DECLARE_SCHEDULE
from .base import AlertEvent
from .rules import _Switches
from .stream import StreamDetector, rounded

_DECLARES = (DECLARE_DATA, DECLARE_SCHEDULE)


class _Track:
    """One series' running state: its baseline, the streaks above and below, the last gradient
    norm seen for it (``EpsHeadroomCollapse``)."""

    __slots__ = ("base", "above", "below", "since", "recent", "grad")

    def __init__(self, window: int, sustain: int) -> None:
        self.base: deque[float] = deque(maxlen=window)
        self.above = self.below = 0
        self.since = -1
        self.recent: deque[float] = deque(maxlen=sustain)  # the values of the current streak
        self.grad = math.nan


class _RankState:
    """One rank's state in a sampled-series rule: a ``_Track`` per series, the declared data
    changes still to come, the last global gradient norm seen (``EpsHeadroomCollapse``)."""

    __slots__ = ("tracks", "switches", "global_grad")

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.tracks: dict[str, _Track] = {}
        self.switches = _Switches(config)
        self.global_grad = math.nan


class _Sampled(StreamDetector):
    """What the sampled-series rules share: series matched by exact name (``needs``) or by prefix
    (``needs_prefixes``, one series per parameter tensor), a ``_Track`` per series, at most
    ``MAX_TRACKED`` of them per detector (ranks together: a run's state stays bounded however
    many tensors and ranks it has), and baselines restarted by the declared changes in
    ``resets``. The series of a record are handled in name order, so ``update`` and
    ``update_columns`` give the same events whatever order the series come in."""

    severity = "warning"
    resets: tuple[str, ...] = ()
    #: fire at ``max(RATIO x baseline, ABS)``, resolve below ``max(RESOLVE_RATIO x baseline, RESOLVE_ABS)``
    RATIO, ABS, RESOLVE_RATIO, RESOLVE_ABS = 4.0, 0.0, 2.0, 0.0
    SUSTAIN, BASELINE, MIN_BASELINE, MAX_TRACKED = 2, 32, 5, 4096

    def __init__(self, config: Mapping[str, Any] | None = None, firing: Iterable[tuple[int, str]] = ()) -> None:
        super().__init__(config, firing)
        self._tracked = 0

    def _new_state(self, rank: int) -> _RankState:
        return _RankState(self.config)

    def _record(self, st: _RankState, step: int, values: Mapping[str, float], rank: int) -> list[AlertEvent]:
        data = DECLARE_DATA in self.resets and st.switches.due(step, values)
        if data or any(d in values for d in self.resets if d != DECLARE_DATA):
            for tr in st.tracks.values():  # what follows a declared change is its new normal
                tr.base.clear()
                tr.above = tr.below = 0
        out: list[AlertEvent] = []
        for name in sorted(values):
            if name not in _DECLARES:
                out += self._point(st, name, step, values[name], values, rank)
        return out

    def _track(self, st: _RankState, name: str) -> _Track | None:
        tr = st.tracks.get(name)
        if tr is None and self._tracked < self.MAX_TRACKED:
            tr = st.tracks[name] = _Track(self.BASELINE, self.SUSTAIN)
            self._tracked += 1
        return tr

    def _point(
        self, st: _RankState, name: str, step: int, v: float, values: Mapping[str, float], rank: int
    ) -> list[AlertEvent]:
        tr = self._track(st, name)
        if tr is None or not math.isfinite(v):
            return []  # non-finite: non_finite pages for the loss and gradient; no baseline, no streak
        if len(tr.base) < self.MIN_BASELINE:
            tr.base.append(v)
            return []
        b = median(tr.base)
        fire_at = max(self.RATIO * b, self.ABS)
        clear_at = max(self.RESOLVE_RATIO * b, self.RESOLVE_ABS)
        if v >= fire_at:
            tr.since = step if tr.above == 0 else tr.since
            tr.above += 1
            tr.recent.append(v)
        else:
            tr.above = 0
            tr.recent.clear()
            tr.base.append(v)
        tr.below = tr.below + 1 if v < clear_at else 0
        if tr.above >= self.SUSTAIN:
            return self._set(
                True,
                rank,
                name,
                step,
                v,
                self._message(name, v, b, step, rank),
                {
                    "window": [tr.since, step],
                    "values": [rounded(x) for x in tr.recent],
                    "baseline": rounded(b),
                    "baseline_samples": len(tr.base),
                    "ratio": rounded(v / b if b > 0 else math.inf),
                    "ratio_at": self.RATIO,
                    "min_value": self.ABS,
                    "threshold": rounded(fire_at),
                    "samples": tr.above,
                },
            )
        if tr.below >= self.SUSTAIN:
            return self._set(
                False,
                rank,
                name,
                step,
                v,
                f"{name} is back near its running median ({v:.3g}, median {b:.3g}) at step {step} on rank {rank}",
            )
        return []

    def _message(self, name: str, v: float, b: float, step: int, rank: int) -> str:
        raise NotImplementedError


class VUnderestimationBurst(_Sampled):
    """Adam's second moment lags the gradient: ``v_underestimation = sqrt(mean g^2 / v_hat_{t-1})``
    is the gradient's size in units of what Adam expects. Adam divides by ``sqrt(v_hat)``, so
    while ``v_hat`` lags a gradient k times its usual size each coordinate's update is up to k
    times its usual size; ``v`` averages over ~1/(1 - beta2) = 1,000 steps and ``m`` over ~10,
    so the update grows long before ``v`` catches up. This lag is the mechanism behind many
    large-model loss spikes (Molybog et al. 2023, "A Theory on Adam Instability").

    Healthy is about 1 (over many coordinates the mean concentrates there); heavy-tailed gradients
    hold some runs higher, hence the series' own median as the baseline. Fires at ``RATIO`` (4)
    times it and at least ``ABS`` (3): a gradient 3-4 times larger than Adam's normalizer is a
    regime change, far outside the step-to-step noise of an average over many coordinates.
    Resolves below twice the median (and 2). A declared data change restarts the baseline: new
    data moves the gradient, and Adam lagging it then is expected."""

    rule = "v_underestimation"
    needs = ("v_underestimation", DECLARE_DATA)
    resets = (DECLARE_DATA,)
    RATIO, ABS, RESOLVE_RATIO, RESOLVE_ABS = 4.0, 3.0, 2.0, 2.0

    def _message(self, name: str, v: float, b: float, step: int, rank: int) -> str:
        return (
            f"Adam's second moment lags the gradient (v_underestimation {v:.3g} against a running median of "
            f"{b:.3g}) at step {step} on rank {rank}"
        )


class UpdateBimodality(_Sampled):
    """Adam's update has turned sign-like: ``update_bimodality`` is the share of coordinates with
    ``|u| > 0.9``, ``u = m_hat / (sqrt(v_hat) + eps)``. Under gradient noise ``|u|`` is small
    (with beta1 = 0.9, pure noise gives u a standard deviation of about 0.23, so |u| > 0.9 is a
    4-sigma event, ~1e-4 of coordinates); it nears 1 only where the gradient is consistent step
    after step or outgrows ``v``. Many coordinates there is Adam degenerating into sign descent,
    every coordinate taking the full LR step, which Molybog et al. (2023) observe as the update
    distribution turning bimodal before a divergence.

    Fires when the share is at least ``ABS`` (10% of coordinates) and ``RATIO`` (4) times its
    own median, resolves below twice the median (and 5%). The first steps of a run are sign-like
    by construction (at t = 1, u = g / |g|) and fall from there, so a median of past samples
    never fires on them. A declared data change restarts the baseline."""

    rule = "update_bimodality"
    needs = ("update_bimodality", DECLARE_DATA)
    resets = (DECLARE_DATA,)
    RATIO, ABS, RESOLVE_RATIO, RESOLVE_ABS = 4.0, 0.1, 2.0, 0.05

    def _message(self, name: str, v: float, b: float, step: int, rank: int) -> str:
        return (
            f"{v:.1%} of Adam's update coordinates are sign-like (|u| > 0.9; running median {b:.1%}) at step "
            f"{step} on rank {rank}"
        )


class UpdateRatioOutlier(_Sampled):
    """One tensor's relative update ``update_ratio/param/{name} = ||dtheta|| / ||theta||`` is an
    order of magnitude (``RATIO``, 10x) above its own running median, on ``SUSTAIN`` samples
    after ``MIN_BASELINE`` samples of baseline. With Adam the ratio is about
    ``lr x rms(u) / rms(theta)``: steady per tensor and scaled by the LR, so 10x its own median
    outruns any smooth schedule (a linear warmup from 0 puts a sample at most 2.5x the median of
    the samples before it) and means the tensor's updates blew up (its v lagging, u turning
    sign-like) or its norm collapsed. ``ABS`` (1e-3): a step that changes a tensor by under 0.1%
    of its norm is too small to harm it, whatever its baseline (a tensor updated from an LR of 0
    has a zero baseline). Resolves below 3x the median. A declared data or schedule change (the ratio
    scales with the LR) restarts the baselines."""

    rule = "update_ratio_outlier"
    needs = (DECLARE_DATA, DECLARE_SCHEDULE)
    needs_prefixes = ("update_ratio/param/",)
    resets = (DECLARE_DATA, DECLARE_SCHEDULE)
    RATIO, ABS, RESOLVE_RATIO, RESOLVE_ABS = 10.0, 1e-3, 3.0, 5e-4
    BASELINE = 16  # per tensor: MAX_TRACKED tracks of 16 floats

    def _message(self, name: str, v: float, b: float, step: int, rank: int) -> str:
        return (
            f"tensor {name[len(self.needs_prefixes[0]) :]} was updated by {v:.3g} of its norm, against a running "
            f"median of {b:.3g}, at step {step} on rank {rank}"
        )


class EpsHeadroomCollapse(_Sampled):
    """A tensor that has a gradient but whose second moment is at epsilon's scale:
    ``eps_headroom = log10(median sqrt(v_hat) / eps)`` in decades. Adam's update is
    ``m_hat / (sqrt(v_hat) + eps)``, so at ``h`` decades eps is ``1 / (1 + 10^h)`` of the
    denominator: 24% at ``FIRE`` (0.5 decade), 50% at 0. Below that the update is damped by eps,
    not normalized by v: the tensor is learning at a fraction of its LR (tiny gradients, a
    loss scale gone wrong, eps set for another dtype). Fires below ``FIRE`` on ``SUSTAIN``
    samples when the tensor's gradient norm (``grad_norm/param/{name}``, of the same record or
    the last one seen) is finite and at least ``REL_GRAD`` of the model's ``grad_norm``: a tensor
    without gradient (or with rounding noise for one, as a bias ahead of a normalization layer)
    decays its v by design.
    Resolves at ``RESOLVE`` (1 decade: eps under 10% of the denominator). Also reads the global
    ``eps_headroom`` (a sample over all tensors) with the global ``grad_norm``. A median of 0
    (-inf decades: most coordinates never had a gradient, a sparsely used tensor) is no reading."""

    rule = "eps_headroom_collapse"
    needs = ("eps_headroom", "grad_norm")
    needs_prefixes = ("eps_headroom/param/", "grad_norm/param/")
    FIRE, RESOLVE, REL_GRAD = 0.5, 1.0, 1e-5
    BASELINE = 16

    def _point(
        self, st: _RankState, name: str, step: int, h: float, values: Mapping[str, float], rank: int
    ) -> list[AlertEvent]:
        if name.startswith("grad_norm"):  # the gradient a headroom is judged with, for later records
            tr = st.tracks.get("eps_headroom" + name[len("grad_norm") :])
            if tr is not None:
                tr.grad = h
            return []
        tr = self._track(st, name)
        if tr is None or math.isnan(h) or h == -math.inf:
            return []
        g = values.get("grad_norm" + name[len("eps_headroom") :], tr.grad)
        tr.grad = g
        if "grad_norm" in values:
            st.global_grad = values["grad_norm"]
        whole = st.global_grad
        # "has a gradient": not merely nonzero, but within REL_GRAD of the model's; a bias ahead of
        # a normalization layer gets ~1e-8 of rounding noise, and its v rightly sits at eps
        has_grad = math.isfinite(g) and g > 0 and not (math.isfinite(whole) and g < self.REL_GRAD * whole)
        low = h < self.FIRE and has_grad
        if low:
            tr.since = step if tr.above == 0 else tr.since
            tr.above += 1
            tr.recent.append(h)
        else:
            tr.above = 0
            tr.recent.clear()
            if math.isfinite(h):
                tr.base.append(h)
        tr.below = tr.below + 1 if h >= self.RESOLVE else 0
        b = median(tr.base) if tr.base else math.nan
        if tr.above >= self.SUSTAIN:
            return self._fire(tr, name, step, h, g, b, rank)
        if tr.below >= self.SUSTAIN:
            return self._set(
                False,
                rank,
                name,
                step,
                h,
                f"{name} is back to {h:.2f} decades of headroom at step {step} on rank {rank}",
            )
        return []

    def _fire(self, tr: _Track, name: str, step: int, h: float, g: float, b: float, rank: int) -> list[AlertEvent]:
        """The eps-dominated alert, with the streak's values as evidence."""
        what = "the model's" if name == "eps_headroom" else f"tensor {name[len(self.needs_prefixes[0]) :]}'s"
        return self._set(
            True,
            rank,
            name,
            step,
            h,
            f"{what} second moment is at epsilon's scale ({h:.2f} decades of headroom, gradient "
            f"norm {g:.3g}): Adam's update is eps-dominated at step {step} on rank {rank}",
            {
                "window": [tr.since, step],
                "values": [rounded(x) for x in tr.recent],
                "baseline": rounded(b),
                "threshold": self.FIRE,
                "resolve_at": self.RESOLVE,
                "grad_norm": rounded(g),
                "samples": tr.above,
            },
        )

"""What the stateful detectors share: per-rank state, the columnar entry point, one alert per
incident, and a robust measure of training progress.

A ``StreamDetector`` reads a handful of series (``needs``); the collector hands it whole batches,
of which only those series' points reach Python, record by record, so the rule is written once,
as a streaming function of one record, and both entry points give the same transitions.

The series through which a run declares a planned change (``Run.declare``) are defined in
``optiscope.wire`` (``DECLARE_DATA``, ``DECLARE_SCHEDULE``) and re-exported here.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from statistics import median
from typing import Any

import numpy as np

from ..wire import DECLARE_DATA as DECLARE_DATA
from ..wire import DECLARE_SCHEDULE as DECLARE_SCHEDULE
from ..wire import encode_value
from .base import AlertEvent, OpenIncidents, SeriesColumns


def finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def rounded(x: float, digits: int = 6) -> float | str:
    """A value for the evidence: JSON-safe (non-finite values spelled as the wire spells them)."""
    if not math.isfinite(x):
        return encode_value(x)
    return float(f"{x:.{digits}g}")


class StreamDetector(OpenIncidents):
    """Base of the stateful rules. Subclasses set ``rule``, ``severity``, ``needs`` (and
    ``needs_prefixes`` for series they read by prefix; see ``Detector``) and implement
    ``_record(state, step, values, rank) -> list[AlertEvent]``; ``_new_state(rank)`` makes a rank's
    state. ``firing`` holds the (rank, series) of open incidents (restored by the collector)."""

    rule = ""
    severity = "page"
    needs: tuple[str, ...] = ()
    needs_prefixes: tuple[str, ...] = ()

    def __init__(self, config: Mapping[str, Any] | None = None, firing: Iterable[tuple[int, str]] = ()) -> None:
        super().__init__(firing)
        self.config = dict(config or {})
        self._states: dict[int, Any] = {}

    def _new_state(self, rank: int) -> Any:
        raise NotImplementedError

    def _record(self, state: Any, step: int, values: Mapping[str, float], rank: int) -> list[AlertEvent]:
        raise NotImplementedError

    def _state(self, rank: int) -> Any:
        st = self._states.get(rank)
        if st is None:
            st = self._states[rank] = self._new_state(rank)
        return st

    def _wanted(self, names: Collection[str]) -> list[str]:
        """The names, among those present, that this rule reads: its ``needs``, and those that start
        with one of its ``needs_prefixes``."""
        if not self.needs_prefixes:
            return [n for n in self.needs if n in names]  # a few lookups, whatever the batch holds
        return [n for n in names if n in self.needs or n.startswith(self.needs_prefixes)]

    def update(self, step: int, values: Mapping[str, float], rank: int = 0) -> list[AlertEvent]:
        mine = {k: values[k] for k in self._wanted(values)}
        return self._record(self._state(rank), step, mine, rank) if mine else []

    def update_columns(self, steps: np.ndarray, series: SeriesColumns, rank: int = 0) -> list[AlertEvent]:
        rows: dict[int, dict[str, float]] = {}
        for name in self._wanted(series):  # names only: a batch's other series are never decoded
            idx, values = series[name]
            for i, v in zip(np.asarray(idx).tolist(), np.asarray(values, dtype=np.float64).tolist()):
                rows.setdefault(i, {})[name] = v
        if not rows:
            return []
        st = self._state(rank)
        return [ev for i in sorted(rows) for ev in self._record(st, int(steps[i]), rows[i], rank)]

    def _set(
        self,
        on: bool,
        rank: int,
        series: str,
        step: int,
        value: float,
        message: str,
        evidence: Mapping[str, Any] | None = None,
    ) -> list[AlertEvent]:
        """The transition, if ``on`` differs from the incident's state: one alert per incident."""
        key = (rank, series)
        if on == (key in self.firing):
            return []
        (self.firing.add if on else self.firing.discard)(key)
        return [
            AlertEvent(
                self.rule,
                self.severity,
                "firing" if on else "resolved",
                series,
                step,
                rank,
                float(value),
                message,
                dict(evidence or {}),
            )
        ]


class Progress:
    """How much of its progress a run has given back, robustly, in linear scale.

    The loss is smoothed with a running median over ``window`` steps (one outlier batch moves a
    median by one rank, not by its size). ``L0`` is the first smoothed loss since the start (or
    since a declared data change, which starts a new baseline), ``m`` the lowest since; rules read
    it only ``grace`` steps after the start. ``gave_back() = (S - m) / (L0 - m)``: 0 at the best point, 1
    when every bit of progress is lost. It is defined only once the progress ``L0 - m`` stands out
    of the loss's own step-to-step noise, and is a difference of losses, so a loss near zero that
    doubles gives back almost nothing."""

    #: a loss this many times the smoothed loss is a shock (an outlier batch, a corrupted input):
    #: what follows is the run healing from it, and rules give it time
    SHOCK = 20.0
    #: a spike more than AFTERMATH steps (the same event's next losses) but fewer than SHOCK_GAP
    #: after the last makes both instability, not shocks
    AFTERMATH, SHOCK_GAP = 10, 100
    #: progress must be this many times the loss's spread (MAD) at its best point before any part of
    #: it can be "given back": the best running median is itself a noise excursion, biased low by
    #: about one MAD over a long run, so a smaller margin reads the median's wobble as regression
    MIN_PROGRESS = 10.0

    def __init__(self, window: int = 25, grace: int = 30, long: int = 200):
        self.window, self.grace, self.long_window = window, grace, long
        self.shock_step = self.repeat_step = -1
        self.last_spike = -math.inf
        self.reset(0)

    def reset(self, step: int) -> None:
        self.start = step
        self.recent: deque[float] = deque(maxlen=self.window)
        # the last long_window + 2 losses that were not shocks: what "unprecedented" is judged against
        self.long: deque[float] = deque(maxlen=self.long_window + 2)
        self.S = math.nan
        self.L0: float | None = None
        self.m = math.inf
        self.noise = math.nan

    def add(self, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            return
        if self.L0 is not None and self.S > 0 and loss > self.SHOCK * self.S:
            since = step - self.last_spike
            if since <= self.AFTERMATH:
                pass  # the same event: a damaged model's next few losses
            elif since < self.SHOCK_GAP:
                # spikes that come back are instability, not an outlier batch: no healing time
                self.shock_step, self.repeat_step = -1, step
            else:
                self.shock_step = step
            self.last_spike = step
        if self.shock_step != step:
            self.long.append(loss)
        self.recent.append(loss)
        if len(self.recent) <= self.window // 2:
            return
        self.S = median(self.recent)
        spread = median(abs(x - self.S) for x in self.recent)
        if self.L0 is None:  # the loss when watching began (or the data changed): the baseline
            self.L0 = self.m = self.S
            self.noise = spread
        elif self.S < self.m:
            # the spread at the best point: what the progress must stand out of (a diverging
            # loss's own spread is no measure of the noise of the run it came from)
            self.m, self.noise = self.S, spread

    def unprecedented(self, min_prior: int = 1) -> float | None:
        """The lower of the last two losses when both are above every loss of the (up to
        ``long_window``, at least ``min_prior``) steps before them, else None: a heavy-tailed loss
        has bad batches, rarely two unprecedented ones in a row."""
        if len(self.long) < 2 + max(1, min_prior):
            return None
        *prior, a, b = self.long
        low = min(a, b)
        return low if low > max(prior) else None

    def ready(self, step: int) -> bool:
        """Past the grace period: the baseline has had ``grace`` steps to form."""
        return self.L0 is not None and step - self.start >= self.grace

    @property
    def progress(self) -> float:
        return self.L0 - self.m if self.L0 is not None else math.nan

    def gave_back(self) -> float | None:
        if self.L0 is None or not self.progress > self.MIN_PROGRESS * self.noise:
            return None
        return (self.S - self.m) / self.progress

    def evidence(self) -> dict[str, Any]:
        return {
            "smoothed_loss": rounded(self.S),
            "best_smoothed_loss": rounded(self.m),
            "baseline_loss": rounded(self.L0 if self.L0 is not None else math.nan),
            "loss_noise_mad": rounded(self.noise),
            "median_window_steps": self.window,
            "baseline_from_step": self.start,
        }

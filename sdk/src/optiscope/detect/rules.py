"""The paging rules that watch the loss, the learning rate and activation headroom.

Each is a ``StreamDetector`` (per rank, one alert per incident); thresholds are class attributes
so a collector or a user can tune them, and every firing event carries its evidence.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from statistics import median
from typing import Any

from ..wire import DECLARE_DATA, DECLARE_SCHEDULE
from .base import AlertEvent
from .schedule import declared_schedule, declared_steps
from .stream import Progress, StreamDetector, rounded

#: Steps at the start of a run (and after a declared data change) in which no loss baseline
#: exists yet, so no loss rule can fire: the warmup grace period.
GRACE_STEPS = 30


class _Switches:
    """Declared data changes: the config's ``data_mixture_switch_steps`` and ``declare/data_change``
    points. ``due(step, values)`` is True once per change, on the first record at or after it."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.pending = deque(declared_steps(config, "data_mixture_switch_steps"))

    def due(self, step: int, values: Mapping[str, float]) -> bool:
        hit = DECLARE_DATA in values
        while self.pending and self.pending[0] <= step:
            self.pending.popleft()
            hit = True
        return hit


class LossRegression(StreamDetector):
    """The loss has given back ``FIRE`` of the progress it had made (``Progress``: a running
    median, in linear scale) for ``SUSTAIN`` steps in a row *and is not recovering*: the median of
    the last ``TREND`` losses is no lower than that of the ``TREND`` before (after a shock, judged
    on the losses since it only, so given 2 x ``TREND`` steps to heal). A run knocked back by one bad batch, that is
    already learning its way back, is not paged; one that keeps losing ground is. Resolves below
    ``RESOLVE``."""

    rule, severity = "loss_regression", "page"
    needs = ("loss", DECLARE_DATA)
    FIRE, RESOLVE, SUSTAIN, TREND, HEALING = 0.4, 0.2, 10, 20, 0.0

    def _new_state(self, rank: int) -> dict[str, Any]:
        return {
            "p": Progress(grace=GRACE_STEPS),
            "switches": _Switches(self.config),
            "above": 0,
            "raw": deque(maxlen=2 * self.TREND),
        }

    def _record(self, st: dict[str, Any], step: int, values: Mapping[str, float], rank: int) -> list[AlertEvent]:
        p: Progress = st["p"]
        if st["switches"].due(step, values):
            p.reset(step)  # a new baseline, and nothing from before the change counts towards a page
            st["above"] = 0
            st["raw"].clear()
        if "loss" not in values:
            return []
        p.add(step, values["loss"])
        if p.shock_step == step:
            st["raw"].clear()  # judge the healing on what follows the shock only
        elif math.isfinite(values["loss"]):
            st["raw"].append(values["loss"])
        g = p.gave_back() if p.ready(step) else None
        if g is None:
            return []
        st["above"] = st["above"] + 1 if g >= self.FIRE else 0
        raw = list(st["raw"])  # recovering: the last TREND losses are lower than the TREND before
        recovering = (
            len(raw) < 2 * self.TREND
            and p.shock_step >= 0
            or len(raw) == 2 * self.TREND
            and median(raw[self.TREND :]) < median(raw[: self.TREND]) - self.HEALING * p.progress
        )
        if st["above"] >= self.SUSTAIN and not recovering:
            return self._set(
                True,
                rank,
                "loss",
                step,
                values["loss"],
                f"the loss has given back {g:.0%} of its progress (smoothed {p.S:.4g}, best "
                f"{p.m:.4g}, baseline {p.L0:.4g}) for {st['above']} steps at step {step} on rank {rank}",
                {
                    "window": [step - st["above"] + 1, step],
                    "gave_back": rounded(g),
                    "fire_at": self.FIRE,
                    **p.evidence(),
                },
            )
        if g < self.RESOLVE:
            return self._set(
                False,
                rank,
                "loss",
                step,
                values["loss"],
                f"the loss recovered (smoothed {p.S:.4g}, best {p.m:.4g}) at step {step} on rank {rank}",
            )
        return []


class _Schedule:
    """The declared LR envelope, rescaled when the run declares a schedule change."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.ref = declared_schedule(config)
        self.scale = 1.0
        self.pending = False

    def ratio(self, step: int, values: Mapping[str, float]) -> float | None:
        if DECLARE_SCHEDULE in values:
            self.pending = True  # Run.declare sends it as a record of its own: the next LR is the reference
        lr = values.get("lr")
        if self.ref is None or lr is None or not math.isfinite(lr):
            return None
        ref = self.ref(step) * self.scale
        if self.pending and ref > 0 and lr > 0:
            self.scale *= lr / ref  # the LR now in use is the new declared reference
            self.pending = False
            return 1.0
        return lr / ref if ref > 0 else None


class LrOffSchedule(StreamDetector):
    """Warning: the LR of param group 0 has been above the declared schedule by a factor of
    ``FIRE`` or more for ``SUSTAIN`` steps (a lost scheduler state, a unit error, a broken
    scheduler). Never pages on its own: ``LrAboveSchedule`` pages once the loss suffers."""

    rule, severity = "lr_off_schedule", "warning"
    needs = ("lr", DECLARE_SCHEDULE)
    FIRE, RESOLVE, SUSTAIN = 1.5, 1.2, 3

    def _new_state(self, rank: int) -> dict[str, Any]:
        return {"s": _Schedule(self.config), "above": 0, "below": 0}

    def _record(self, st: dict[str, Any], step: int, values: Mapping[str, float], rank: int) -> list[AlertEvent]:
        r = st["s"].ratio(step, values)
        if r is None:
            return []
        st["above"] = st["above"] + 1 if r >= self.FIRE else 0
        st["below"] = st["below"] + 1 if r <= self.RESOLVE else 0
        lr = values["lr"]
        if st["above"] >= self.SUSTAIN:
            return self._set(
                True,
                rank,
                "lr",
                step,
                lr,
                f"the learning rate {lr:.3g} is {r:.3g}x the declared schedule at step {step} on rank {rank}",
                {
                    "window": [step - st["above"] + 1, step],
                    "ratio": rounded(r),
                    "declared": rounded(lr / r),
                    "fire_at": self.FIRE,
                },
            )
        if st["below"] >= self.SUSTAIN:
            return self._set(
                False,
                rank,
                "lr",
                step,
                lr,
                f"the learning rate is back on the declared schedule at step {step} on rank {rank}",
            )
        return []


class LrAboveSchedule(StreamDetector):
    """Page: the LR is above the declared schedule (``RATIO`` or more) *and* the loss has started
    to suffer: the running median ``NOISE_K`` noise spreads (MADs at the best point) above its best,
    or ``SLOW`` of the progress given back, for ``SUSTAIN`` steps; or ``SHORT_BAR`` of it on the
    median of the last ``SHORT`` steps, higher than the ``SHORT`` before, for ``SUSTAIN`` steps
    (``EarlyDivergence``'s test, with the LR as the corroborating signal in place of the gradient
    norm); or ``FAST`` of it on each of the last two steps, both beyond every loss of the ``LONG``
    steps before. A known cause lowers the bar the loss
    must clear: with the LR on schedule, the other rules need more evidence."""

    rule, severity = "lr_above_schedule", "page"
    needs = ("lr", "loss", DECLARE_DATA, DECLARE_SCHEDULE)
    RATIO, SLOW, FAST, SUSTAIN, RESOLVE, SHORT, SHORT_BAR = 2.0, 0.2, 0.5, 3, 0.1, 8, 0.2
    NOISE_K, LONG = 6.0, 200

    def _new_state(self, rank: int) -> dict[str, Any]:
        return {
            "s": _Schedule(self.config),
            "p": Progress(grace=GRACE_STEPS, long=self.LONG),
            "switches": _Switches(self.config),
            "slow": 0,
            "short": 0,
            "last": deque(maxlen=2 * self.SHORT),
            "ratio": None,
        }

    def _record(self, st: dict[str, Any], step: int, values: Mapping[str, float], rank: int) -> list[AlertEvent]:
        p: Progress = st["p"]
        if st["switches"].due(step, values):
            p.reset(step)
            st["slow"] = st["short"] = 0
            st["last"].clear()
        r = st["s"].ratio(step, values)
        if r is not None:
            st["ratio"] = r
        if "loss" not in values:
            return []
        loss = values["loss"]
        p.add(step, loss)
        if math.isfinite(loss):
            st["last"].append(loss)
        g = p.gave_back() if p.ready(step) else None
        r = st["ratio"]
        if g is None or r is None:
            return []
        st["slow"] = st["slow"] + 1 if g >= self.SLOW or (self.NOISE_K and p.S - p.m >= self.NOISE_K * p.noise) else 0
        fast = self._last_two(p)
        rising = self._rising(st, p)
        st["short"] = st["short"] + 1 if rising >= self.SHORT_BAR else 0
        if r >= self.RATIO and (st["slow"] >= self.SUSTAIN or st["short"] >= self.SUSTAIN or fast >= self.FAST):
            return self._set(
                True,
                rank,
                "lr",
                step,
                values.get("lr", math.nan),
                f"the learning rate is {r:.3g}x the declared schedule and the loss is regressing "
                f"({self._why(st, p, g, fast, rising)}) at step {step} on rank {rank}",
                {
                    "ratio": rounded(r),
                    "ratio_at": self.RATIO,
                    "gave_back": rounded(g),
                    "gave_back_last_two": rounded(fast),
                    "window": [step - max(st["slow"], 2) + 1, step],
                    **p.evidence(),
                },
            )
        if r < self.RATIO and g < self.RESOLVE:
            return self._set(
                False,
                rank,
                "lr",
                step,
                values.get("lr", math.nan),
                f"the learning rate is back on schedule and the loss recovered at step {step} on rank {rank}",
            )
        return []

    def _last_two(self, p: Progress) -> float:
        """The share of the progress given back on each of the last two steps, -inf unless both
        losses are unprecedented."""
        # two losses in a row beyond every loss of the LONG steps before: not a heavy tail's bad batch
        low = p.unprecedented()
        return (low - p.m) / p.progress if low is not None else -math.inf

    def _rising(self, st: dict[str, Any], p: Progress) -> float:
        """The share of the progress the median of the last ``SHORT`` losses gives back, -inf unless
        it is above the median of the ``SHORT`` before."""
        last: list[float] = list(st["last"])
        if len(last) == 2 * self.SHORT and median(last[self.SHORT :]) > median(last[: self.SHORT]):
            return (median(last[self.SHORT :]) - p.m) / p.progress
        return -math.inf

    def _why(self, st: dict[str, Any], p: Progress, g: float, fast: float, rising: float) -> str:
        """Which regression pages, in words: the smoothed one, the short rising one, or the last two steps."""
        spreads = (p.S - p.m) / p.noise if p.noise > 0 else math.inf
        return (
            f"smoothed, {g:.0%} of its progress given back, {spreads:.3g} noise spreads above its best"
            if st["slow"] >= self.SUSTAIN
            else f"{rising:.0%} given back over the last {self.SHORT} steps, and rising"
            if st["short"] >= self.SUSTAIN
            else f"{fast:.0%} given back on each of the last two steps"
        )


class OverflowForecast(StreamDetector):
    """Page: the activation headroom (``act_headroom_bits``: log2 of the dtype's ceiling over the
    largest output) trends to zero within ``HORIZON`` steps: a least-squares line through the
    last ``WINDOW`` points, fitted in bits, i.e. in log scale, where exponential growth is a
    straight line; and the headroom is already ``MARGIN`` bits or less (an output within 2^MARGIN
    of the ceiling): early in training attention sharpens fast and then levels off, so a trend
    far from the ceiling is no forecast. An output that reached the ceiling (0 bits or an
    overflow, -inf) pages at once. Resolves when the forecast is beyond twice the horizon."""

    rule, severity = "activation_overflow", "page"
    needs = ("act_headroom_bits",)
    HORIZON, WINDOW, MARGIN = 50, 50, 3.0

    def _new_state(self, rank: int) -> deque[tuple[int, float]]:
        return deque(maxlen=self.WINDOW)

    def _record(
        self, pts: deque[tuple[int, float]], step: int, values: Mapping[str, float], rank: int
    ) -> list[AlertEvent]:
        h = values["act_headroom_bits"]
        if math.isnan(h):
            return []  # a NaN output: the loss goes NaN with it, and non_finite pages for that
        if h <= 0:
            return self._set(
                True,
                rank,
                "act_headroom_bits",
                step,
                h,
                f"an activation reached its dtype's largest value (headroom {h:.3g} bits) at step "
                f"{step} on rank {rank}",
                {"headroom_bits": rounded(h), "window": [step, step]},
            )
        pts.append((step, h))
        if len(pts) < self.WINDOW or step < GRACE_STEPS:
            return []
        n = len(pts)
        xs = [s for s, _ in pts]
        ys = [v for _, v in pts]
        mx, my = sum(xs) / n, sum(ys) / n
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
        now = my + slope * (step - mx)
        eta = now / -slope if slope < 0 else math.inf
        if eta <= self.HORIZON and now <= self.MARGIN:
            return self._set(
                True,
                rank,
                "act_headroom_bits",
                step,
                h,
                f"activation headroom is {now:.2f} bits and falling {-slope * 100:.2f} bits per 100 "
                f"steps: the dtype's ceiling in about {eta:.0f} steps (step {step}, rank {rank})",
                {
                    "window": [xs[0], step],
                    "headroom_bits": rounded(now),
                    "bits_per_step": rounded(slope),
                    "steps_to_ceiling": rounded(eta),
                    "horizon_steps": self.HORIZON,
                },
            )
        if eta > 2 * self.HORIZON:
            return self._set(
                False,
                rank,
                "act_headroom_bits",
                step,
                h,
                f"activation headroom is stable at {now:.2f} bits (step {step}, rank {rank})",
            )
        return []


class EarlyDivergence(StreamDetector):
    """Page: the loss and the gradient norm agree that training is coming apart, before the
    smoothed loss shows it. Over the last ``SHORT`` steps the median loss has given back ``LOSS``
    of the progress and is higher than over the ``SHORT`` steps before, and the median gradient
    norm is ``GRAD`` times its own median over the ``LONG`` steps before that, for ``SUSTAIN``
    steps. Either signal alone is common in healthy training; together they are not. After a
    shock (one step's loss ``SHOCK`` times the smoothed loss: an outlier batch), both are expected
    to be high while the run heals, so the rule holds off for ``HOLD`` steps and then until the
    short median is back under half the bar, and leaves a run that does not heal to ``LossRegression``."""

    rule, severity = "early_divergence", "page"
    needs = ("loss", "grad_norm", DECLARE_DATA)
    SHORT, LONG, LOSS, GRAD, SUSTAIN, HOLD = 8, 200, 0.2, 1.5, 3, 50
    FAST = 0.5  # a sudden collapse: each of the last two losses gave back FAST, each grad norm GRAD x its baseline

    def _new_state(self, rank: int) -> dict[str, Any]:
        return {
            "p": Progress(grace=GRACE_STEPS, long=self.LONG),
            "switches": _Switches(self.config),
            "loss": deque(maxlen=2 * self.SHORT),
            "gn": deque(maxlen=self.LONG + self.SHORT),
            "hold_until": -1,
            "healing": False,
            "on": 0,
        }

    def _record(self, st: dict[str, Any], step: int, values: Mapping[str, float], rank: int) -> list[AlertEvent]:
        loss = self._observe(st, step, values)
        p: Progress = st["p"]
        if loss is None or not p.ready(step) or step < st["hold_until"] or p.gave_back() is None:
            return []
        ls, gs = list(st["loss"]), list(st["gn"])
        if len(ls) < 2 * self.SHORT or len(gs) < self.LONG // 2 + self.SHORT:
            return []
        now, before = median(ls[self.SHORT :]), median(ls[: self.SHORT])
        g = (now - p.m) / p.progress
        if st["healing"]:
            st["healing"] = g >= self.LOSS / 2
            return []
        gn_now, gn_base = median(gs[-self.SHORT :]), median(gs[: -self.SHORT])
        agree = g >= self.LOSS and now > before and gn_now >= self.GRAD * gn_base
        st["on"] = st["on"] + 1 if agree else 0
        what = self._what(st, p, g, gs, gn_now, gn_base)
        if what is not None:
            return self._set(
                True,
                rank,
                "loss",
                step,
                loss,
                f"{what} that training is diverging at step {step} on rank {rank}",
                {
                    "window": [step - self.SHORT + 1, step],
                    "gave_back": rounded(g),
                    "loss_median": rounded(now),
                    "loss_median_before": rounded(before),
                    "grad_norm_median": rounded(gn_now),
                    "grad_norm_baseline": rounded(gn_base),
                    "grad_norm_ratio_at": self.GRAD,
                    **p.evidence(),
                },
            )
        if g < self.LOSS / 2 and gn_now < self.GRAD * gn_base:
            return self._set(
                False,
                rank,
                "loss",
                step,
                loss,
                f"loss and gradient norm are back to their baselines at step {step} on rank {rank}",
            )
        return []

    def _observe(self, st: dict[str, Any], step: int, values: Mapping[str, float]) -> float | None:
        """Takes in the record's gradient norm and loss, a declared data change and a shock; the
        loss if it is finite, else None."""
        p: Progress = st["p"]
        if st["switches"].due(step, values):
            p.reset(step)
            st["hold_until"] = step + GRACE_STEPS
            st["loss"].clear()
            st["on"] = 0
        gn = values.get("grad_norm")
        if gn is not None and math.isfinite(gn):
            st["gn"].append(gn)
        loss = values.get("loss")
        if loss is None or not math.isfinite(loss):
            return None
        p.add(step, loss)
        if p.shock_step == step:
            st["healing"], st["hold_until"] = True, step + self.HOLD
        elif p.repeat_step == step:
            st["healing"], st["hold_until"] = False, -1
        st["loss"].append(loss)
        return loss

    def _what(
        self, st: dict[str, Any], p: Progress, g: float, gs: list[float], gn_now: float, gn_base: float
    ) -> str | None:
        """What agrees that training is diverging, in words: the sustained loss and gradient norm,
        or a sudden collapse; None if nothing does."""
        # a sudden collapse: the last two losses are each beyond every loss of the LONG steps before
        # (a heavy-tailed loss has bad batches, rarely two unprecedented ones in a row), FAST of the
        # progress given back, and both gradient norms GRAD x their baseline
        low = p.unprecedented(self.LONG // 2)
        fast = (
            self.FAST > 0
            and low is not None
            and low - p.m >= self.FAST * p.progress
            and min(gs[-2:]) >= self.GRAD * gn_base
        )
        if st["on"] >= self.SUSTAIN:
            return (
                f"the loss ({g:.0%} of its progress given back over the last {self.SHORT} steps, and rising) "
                f"and the gradient norm ({gn_now / gn_base:.2g}x its baseline) agree"
            )
        if fast and low is not None:
            return (
                f"the last two losses (each above every loss of the {len(p.long) - 2} steps before, "
                f"{(low - p.m) / p.progress:.0%} of the progress given back) and gradient norms "
                f"({min(gs[-2:]) / gn_base:.2g}x their baseline) agree"
            )
        return None

"""The learning-rate schedule a run declared in its config, as an upper envelope per step.

Conventions differ between libraries (warmup over ``(s + 1) / W`` or ``s / W``, cosine decay
over ``total`` or ``total - warmup`` steps), so the envelope is the largest value any of them
gives at the step or the next one: a run that follows its declared schedule under any of these
conventions is never above it. Unknown schedule names fall back to the declared peak, which
every schedule family stays under.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard

PEAK_KEYS = ("lr_peak", "peak_lr", "max_lr", "lr", "learning_rate")
WARMUP_KEYS = ("warmup_steps", "num_warmup_steps", "warmup")
TOTAL_KEYS = ("total_steps", "max_steps", "num_training_steps", "steps")
MIN_KEYS = ("lr_min", "min_lr", "eta_min")
CONSTANT = {"constant", "none", "fixed"}
WARMUP_CONSTANT = {"linear_warmup_constant", "warmup_constant", "constant_with_warmup", "linear_warmup"}
COSINE = {"linear_warmup_cosine", "warmup_cosine", "cosine", "cosine_with_warmup", "cosine_annealing"}
LINEAR = {"linear_warmup_linear", "linear", "linear_with_warmup", "linear_decay", "warmup_linear"}


def _finite(v: Any) -> TypeGuard[int | float]:
    """A number a float holds: not a bool, not NaN or Inf, not an integer beyond float64 (a config
    is the user's JSON: 10**400 is valid there, and must not make every batch of the run fail)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _number(config: Mapping[str, Any], keys: tuple[str, ...]) -> float | None:
    for k in keys:
        v = config.get(k)
        if _finite(v):
            return float(v)
    return None


def declared_schedule(config: Mapping[str, Any] | None) -> Callable[[int], float] | None:
    """``step -> the most LR the declared schedule allows at that step``, or None when the config
    declares no peak LR."""
    config = config or {}
    peak = _number(config, PEAK_KEYS)
    if peak is None or peak <= 0:
        return None
    warm = max(0, int(_number(config, WARMUP_KEYS) or 0))
    total = _number(config, TOTAL_KEYS)
    low = max(0.0, _number(config, MIN_KEYS) or 0.0)
    name = str(
        config.get("schedule")
        or config.get("lr_schedule")
        or config.get("lr_scheduler_type")
        or ("linear_warmup_constant" if warm else "constant")
    ).lower()
    # "constant" with warmup steps and no explicit schedule name was chosen above; an explicit
    # "constant" is taken at its word

    def ramp(s: int) -> float:  # the warmup factor under the most generous convention
        return 1.0 if warm == 0 or s + 2 >= warm else (s + 2) / warm

    def decay(s: int) -> float:  # in [0, 1]: the most generous of "over total" and "over total - warmup"
        if not total or total <= 0:
            return 1.0
        fracs = [min(max(s, 0) / total, 1.0)]
        if total > warm:
            fracs.append(min(max(s - warm, 0) / (total - warm), 1.0))
        f = min(fracs)
        return 0.5 * (1 + math.cos(math.pi * f)) if name in COSINE else 1.0 - f

    if name in CONSTANT:  # a constant schedule has no warmup (as transformers' "constant" ignores it)
        return lambda s: peak
    if name in WARMUP_CONSTANT:
        return lambda s: peak * ramp(s)
    if name in COSINE or name in LINEAR:
        return lambda s: max(low, low + (peak - low) * min(ramp(s), decay(s)))
    return lambda s: peak


def declared_steps(config: Mapping[str, Any] | None, key: str) -> list[int]:
    """A list of step numbers the config declares (e.g. ``data_mixture_switch_steps``)."""
    v = (config or {}).get(key)
    if not isinstance(v, (list, tuple)):
        return []
    return sorted(int(x) for x in v if _finite(x))

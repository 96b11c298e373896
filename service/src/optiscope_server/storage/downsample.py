"""Downsampling a series for a chart without losing what matters: extremes and non-finite values.

A series is cut into buckets of equal step width, the same edges for every rank. In each bucket and
rank the first and last point and the smallest and largest finite value are kept (at most four
points, often fewer where they coincide), and every NaN, +Inf and -Inf is kept wherever it is:
a spike or a NaN in the range is never lost to sampling. The number of buckets is chosen so that
the result holds at most ``max_points`` points when the range has fewer non-finite points than
that; the non-finite points are never dropped, so a range made mostly of them returns them all
(subject to the response limit and its ``truncated`` flag).

Everything works on numpy arrays already ordered by step, one rank at a time, in a handful of
vectorised passes: no per-point Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Plan:
    """Bucket edges shared by every rank: bucket k holds steps [lo + k * width, lo + (k + 1) * width)."""

    lo: int
    width: int


def plan(per_rank: list[tuple[np.ndarray, np.ndarray]], max_points: int) -> Plan | None:
    """The buckets for these ranks' (steps, values), or None when they fit as they are."""
    total = sum(len(s) for s, _ in per_rank)
    if total <= max_points:
        return None
    lo = min(int(s[0]) for s, _ in per_rank if len(s))
    hi = max(int(s[-1]) for s, _ in per_rank if len(s))
    non_finite = sum(int(np.count_nonzero(~np.isfinite(v))) for _, v in per_rank)
    ranks = sum(1 for s, _ in per_rank if len(s))
    buckets = max(1, (max_points - non_finite) // (4 * ranks))
    return Plan(lo, max(1, -(-(hi - lo + 1) // buckets)))


def keep(steps: np.ndarray, values: np.ndarray, p: Plan) -> np.ndarray:
    """Indices (ascending) of one rank's points that the downsampled series keeps. ``steps`` is
    strictly increasing."""
    n = len(steps)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    # bucket starts by binary search on the edges: no pass over the points
    first, last = (int(steps[0]) - p.lo) // p.width, (int(steps[-1]) - p.lo) // p.width
    edges = p.lo + p.width * np.arange(first + 1, last + 1, dtype=np.int64)
    starts = np.unique(np.r_[0, np.searchsorted(steps, edges)])
    starts = starts[starts < n]
    ends = np.r_[starts[1:] - 1, n - 1]
    finite = np.isfinite(values)
    every_finite = bool(finite.all())  # the common case: two fewer passes
    picked = [starts, ends, np.flatnonzero(~finite)]
    for reduce, fill in ((np.minimum, np.inf), (np.maximum, -np.inf)):
        v = values if every_finite else np.where(finite, values, fill)
        best = reduce.reduceat(v, starts)
        # the first point of each bucket that reaches its extreme (a bucket with no finite value
        # points at a non-finite one, which is kept anyway)
        at = np.flatnonzero(v == np.repeat(best, ends - starts + 1))
        bucket = np.searchsorted(starts, at, side="right") - 1
        picked.append(at[np.r_[True, bucket[1:] != bucket[:-1]]])
    return np.unique(np.concatenate(picked))

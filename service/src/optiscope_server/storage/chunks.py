"""Chunks: how a decoded batch becomes rows of the ``chunks`` table, and how rows become a series.

All of it is numpy over whole series: the collector does no Python work per point, neither on
ingest nor on read.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from optiscope import wire

from . import downsample

_I8, _F8 = np.dtype("<i8"), np.dtype("<f8")
_NATIVE_LE = sys.byteorder == "little"


@dataclass
class Chunk:
    name: str
    n: int
    step_min: int
    step_max: int
    last_value: float
    steps: bytes | None  # None: every step from step_min to step_max, once, in order
    vals: bytes


class BatchColumns(Mapping):
    """One decoded batch as numpy columns: ``steps`` of the records and, per series name,
    ``(record indices, values)``, computed when a series is first asked for (detectors ask for the
    few they watch)."""

    def __init__(self, cols: wire.Columns):
        self.cols = cols
        self.steps = np.frombuffer(cols.steps, dtype=np.int64)
        self._by_name = {c.name: c for c in cols.series}
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._masks: dict[bytes, np.ndarray] = {}

    def present(self, c: wire.Column) -> np.ndarray | None:
        """Boolean selector of the records that hold ``c``; None when every record does."""
        if c.mask is None:
            return None
        sel = self._masks.get(c.mask)  # sampled series of one batch share a handful of masks
        if sel is None:
            bits = np.unpackbits(np.frombuffer(c.mask, dtype=np.uint8), count=len(self.steps), bitorder="little")
            sel = self._masks[c.mask] = bits.view(bool)
        return sel

    def __getitem__(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        got = self._cache.get(name)
        if got is None:
            c = self._by_name[name]
            sel = self.present(c)
            idx = np.arange(len(self.steps)) if sel is None else np.flatnonzero(sel)
            got = self._cache[name] = (idx, np.frombuffer(c.values, dtype=np.float64))
        return got

    def __iter__(self):
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def chunks(self) -> list[Chunk]:
        """One chunk per non-empty series of the batch. The step side of a chunk depends only on the
        series' mask, and a batch has one or a few masks, so it is worked out once per mask; per
        series there is only its values' bytes and its newest value to take."""
        steps = self.steps
        d = np.diff(steps)
        # The common shapes are cheap: the SDK's steps only grow (its counters record repeats the last
        # step), so the first and last point of each series are its bounds and its newest value.
        ordered, strict = bool((d >= 0).all()), bool((d > 0).all())
        shapes: dict[bytes | None, tuple[int, int, int, int, bytes | None]] = {}
        out = []
        for c in self.cols.series:
            if not len(c.values):
                continue
            shape = shapes.get(c.mask)
            if shape is None:
                sel = self.present(c)
                s = (steps if sel is None else steps[sel]).astype(_I8, copy=False)
                if ordered:
                    lo, hi, last = int(s[0]), int(s[-1]), len(s) - 1
                    # whole steps that strictly grow over a span of len-1 are every step once
                    dense = hi - lo == len(s) - 1 and (strict or bool((np.diff(s) == 1).all()))
                else:
                    lo, hi = int(s.min()), int(s.max())
                    last, dense = len(s) - 1 - int(np.argmax(s[::-1] == hi)), False
                shape = shapes[c.mask] = (len(s), lo, hi, last, None if dense else s.tobytes())
            n, lo, hi, last, sb = shape
            vals = c.values.tobytes() if _NATIVE_LE else np.frombuffer(c.values, np.float64).astype(_F8).tobytes()
            out.append(Chunk(c.name, n, lo, hi, c.values[last], sb, vals))
        return out


def merge(
    rows, start: int | None, end: int | None, limit: int, max_points: int | None = None
) -> tuple[list[int], list[int], list[float], bool, int | None]:
    """(steps, ranks, values, truncated, bucket width) of one series from its chunk rows ``(rank,
    step_min, step_max, steps, vals)`` in storage order: ordered by step then rank, one value per
    (step, rank), the newest write winning; downsampled (see ``downsample``) to about
    ``max_points`` when given and exceeded (the bucket width is None when it was not); at most
    ``limit`` points."""
    ranks = per_rank(rows, start, end)
    width = None
    if max_points is not None:
        p = downsample.plan(list(ranks.values()), max_points)
        if p is not None:
            width = p.width
            for rank, (s, v) in ranks.items():
                k = downsample.keep(s, v, p)
                ranks[rank] = (s[k], v[k])
    if not ranks:
        return [], [], [], False, width
    if len(ranks) == 1:
        ((only, (s, v)),) = ranks.items()
        r = np.full(len(s), only, dtype=np.int64)
    else:
        s = np.concatenate([x for x, _ in ranks.values()])
        v = np.concatenate([x for _, x in ranks.values()])
        r = np.concatenate([np.full(len(x), k, dtype=np.int64) for k, (x, _) in ranks.items()])
        order = np.lexsort((r, s))
        s, v, r = s[order], v[order], r[order]
    truncated = len(s) > limit
    return s[:limit].tolist(), r[:limit].tolist(), v[:limit].tolist(), truncated, width


def per_rank(rows, start: int | None, end: int | None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per rank, (steps, values) in the range, strictly increasing steps, the newest write of a
    step winning. A rank written once per step in step order (the common case) is read without
    a sort."""
    parts: dict[int, list] = {}
    for row in rows:
        parts.setdefault(row[0], []).append(row)
    out = {}
    for rank in sorted(parts):
        s, v = _steps_values(parts[rank])
        if start is not None:
            s, v = s[s >= start], v[s >= start]
        if end is not None:
            s, v = s[s <= end], v[s <= end]
        if len(s) > 1 and not np.all(s[1:] > s[:-1]):
            # Reversed, the newest write of each step comes first; a stable sort keeps it first
            # among its equals, and it is the one kept.
            s, v = s[::-1], v[::-1]
            order = np.argsort(s, kind="stable")
            s, v = s[order], v[order]
            first = np.r_[True, s[1:] != s[:-1]]
            s, v = s[first], v[first]
        if len(s):
            out[rank] = (s, v)
    return out


def _steps_values(rows) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of chunk rows, concatenated. Consecutive steps are stored as their range
    alone; those of all rows come from one arange, not one per row."""
    v = np.frombuffer(b"".join(r[4] for r in rows), dtype=_F8)
    if all(r[3] is None for r in rows):
        lo = np.array([r[1] for r in rows], dtype=np.int64)
        lengths = np.array([r[2] - r[1] + 1 for r in rows], dtype=np.int64)
        first = np.cumsum(lengths) - lengths  # where each row starts in the output
        return np.arange(len(v), dtype=np.int64) + np.repeat(lo - first, lengths), v
    s = np.concatenate(
        [
            np.arange(lo, hi + 1, dtype=np.int64) if sb is None else np.frombuffer(sb, dtype=_I8)
            for _, lo, hi, sb, _ in rows
        ]
    )
    return s, v

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

_I8, _F8 = np.dtype("<i8"), np.dtype("<f8")
_NATIVE_LE = sys.byteorder == "little"


@dataclass
class Chunk:
    name: str
    n: int
    step_min: int
    step_max: int
    last_value: float
    steps: bytes | None   # None: every step from step_min to step_max, once, in order
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


def merge(rows, start: int | None, end: int | None, limit: int) -> tuple[list[int], list[int], list[float], bool]:
    """(steps, ranks, values, truncated) of one series from its chunk rows ``(rank, step_min,
    step_max, steps, vals)`` in storage order: ordered by step then rank, one value per (step,
    rank), the newest write winning."""
    if not rows:
        return [], [], [], False
    steps, vals, ranks = [], [], []
    for rank, lo, hi, sb, vb in rows:
        s = np.arange(lo, hi + 1, dtype=np.int64) if sb is None else np.frombuffer(sb, dtype=_I8)
        steps.append(s)
        vals.append(np.frombuffer(vb, dtype=_F8))
        ranks.append(np.full(len(s), rank, dtype=np.int64))
    s, v, r = np.concatenate(steps), np.concatenate(vals), np.concatenate(ranks)
    keep = np.ones(len(s), dtype=bool)
    if start is not None:
        keep &= s >= start
    if end is not None:
        keep &= s <= end
    # Reversed, the newest write of each (step, rank) comes first; lexsort is stable, so it stays
    # first among its equals and is the one kept.
    s, v, r = s[keep][::-1], v[keep][::-1], r[keep][::-1]
    order = np.lexsort((r, s))
    s, v, r = s[order], v[order], r[order]
    first = np.ones(len(s), dtype=bool)
    first[1:] = (s[1:] != s[:-1]) | (r[1:] != r[:-1])
    s, v, r = s[first], v[first], r[first]
    truncated = len(s) > limit
    return s[:limit].tolist(), r[:limit].tolist(), v[:limit].tolist(), truncated

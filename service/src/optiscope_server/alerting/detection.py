"""The detectors of each run, kept in step with the store.

Detectors are streaming state machines (baselines, running medians, open incidents), held in the
memory of a collector process. That memory is not the truth: a collector restarts, and replicas
behind one Service each receive only some of a run's batches. So before a batch of rank r is fed
to its run's detectors, they are first fed, silently, the points of their series that the store
holds for rank r and that they have not seen: after a restart, the run's first ``REPLAY_HEAD``
steps (where the loss baselines form) and its last ``REPLAY_TAIL`` (every window a rule keeps);
on a replica that missed batches, the steps it missed (at most the last ``REPLAY_TAIL``). Each is
a bounded read through the chunk index, whatever the length of the run. Then the open incidents of that
rank are taken from the alerts table, so no replica fires again what another already fired.

Mixed into ``Store``: it uses the store's engine and ``_read_chunks``. On PostgreSQL a batch's
transaction holds its run's row lock before it gets here, so replicas ingest one run one batch at
a time and each sees what the previous one committed.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Connection

from optiscope.detect import Detector

from .chunks import per_rank
from .db import alerts, chunks, runs, series

REPLAY_HEAD, REPLAY_TAIL = 100, 2000


class _RunDetectors:
    __slots__ = ("dets", "fed", "seq", "names")

    def __init__(self, dets: list[Detector]):
        self.dets = dets
        self.fed: dict[int, int] = {}  # rank -> the last step these detectors were fed
        self.seq: dict[int, int] = {}  # rank -> the sequence number of the last batch fed
        self.names = sorted({n for d in dets for n in getattr(d, "needs", ())})


class Detection:
    def _detectors_for(self, conn: Connection, run_id: str, rank: int, first_step: int,
                       seq: int | None = None) -> list[Detector]:
        """The run's detectors, caught up on rank ``rank`` up to (not including) ``first_step``.
        The batch that follows the last one fed (``seq``) needs no look at the store."""
        entry: _RunDetectors | None = self._detectors.get(run_id)
        if entry is None:
            # the run's config declares its LR schedule and planned data changes
            config = conn.execute(select(runs.c.config).where(runs.c.id == run_id)).scalar()
            entry = self._detectors[run_id] = _RunDetectors(self._new_detectors(config if isinstance(config, dict)
                                                                                else {}))
        fed = entry.fed.get(rank)
        if seq is not None and fed is not None and entry.seq.get(rank) == seq - 1:
            return entry.dets
        if fed is None or fed < first_step - 1:
            if self._replay(conn, run_id, rank, entry, fed, first_step) or fed is None:
                self._restore_firing(conn, run_id, rank, entry)
        return entry.dets

    def _fed(self, run_id: str, rank: int, last_step: int, seq: int | None = None) -> None:
        entry = self._detectors.get(run_id)
        if entry is not None:
            entry.fed[rank] = max(entry.fed.get(rank, -math.inf), last_step)
            if seq is not None:
                entry.seq[rank] = seq

    def _replay(self, conn: Connection, run_id: str, rank: int, entry: _RunDetectors, fed: int | None,
                first_step: int) -> int:
        """Feed the stored points the detectors missed, discarding the transitions (they were, or
        were not, recorded when those points arrived). Returns the number of records fed."""
        if not entry.names:
            return 0
        sids = conn.execute(select(series.c.name, series.c.id).where(
            series.c.run_id == run_id, series.c.name.in_(entry.names))).all()
        end = first_step - 1
        records: dict[int, dict[str, float]] = {}
        for name, sid in sids:
            if fed is None:  # after a restart: where the baselines formed, and every recent window
                s0 = conn.execute(select(chunks.c.step_min).where(chunks.c.series_id == sid, chunks.c.rank == rank)
                                  .order_by(chunks.c.step_max).limit(1)).scalar()
                if s0 is None:
                    continue
                ranges = [(s0, min(s0 + REPLAY_HEAD - 1, end)), (max(first_step - REPLAY_TAIL, s0 + REPLAY_HEAD), end)]
            else:  # a replica that missed batches: what it missed, as far back as a rule looks
                ranges = [(max(fed + 1, first_step - REPLAY_TAIL), end)]
            for lo, hi in ranges:  # bounded reads: a long run's history is never decoded whole
                if lo > hi:
                    continue
                got = per_rank(self._read_chunks(conn, sid, rank, lo, hi), lo, hi).get(rank)
                if got is None:
                    continue
                for s, v in zip(got[0].tolist(), np.asarray(got[1], dtype=np.float64).tolist()):
                    records.setdefault(s, {})[name] = v
        for step in sorted(records):
            for d in entry.dets:
                d.update(step, records[step], rank)
        return len(records)

    @staticmethod
    def _restore_firing(conn: Connection, run_id: str, rank: int, entry: _RunDetectors) -> None:
        """The open incidents of ``rank`` as the alerts table has them (the truth across replicas)."""
        open_: dict[str, set[tuple[int, str]]] = {}
        for rule, s in conn.execute(select(alerts.c.rule, alerts.c.series).where(
                alerts.c.run_id == run_id, alerts.c.rank == rank, alerts.c.state == "firing")).all():
            open_.setdefault(rule, set()).add((rank, s))
        for d in entry.dets:
            firing: Any = getattr(d, "firing", None)
            if isinstance(firing, set):
                firing.difference_update({k for k in firing if k[0] == rank})
                firing.update(open_.get(getattr(d, "rule", None), ()))

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

On PostgreSQL a batch's transaction holds its run's row lock before it gets here, so replicas
ingest one run one batch at a time and each sees what the previous one committed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Connection

from optiscope.detect import AlertEvent, Detector, SeriesColumns, default_detectors

from ..storage.chunks import per_rank
from ..storage.database import Database
from ..storage.series import SeriesStore
from ..storage.tables import runs
from .alerts import AlertStore

REPLAY_HEAD, REPLAY_TAIL = 100, 2000

DetectorFactory = Callable[[Mapping[str, Any]], list[Detector]]


class _RunDetectors:
    __slots__ = ("dets", "fed", "seq", "names")

    def __init__(self, dets: list[Detector]):
        self.dets = dets
        self.fed: dict[int, int] = {}  # rank -> the last step these detectors were fed
        self.seq: dict[int, int] = {}  # rank -> the sequence number of the last batch fed
        self.names = sorted({n for d in dets for n in d.needs})


class DetectorRunner:
    """The detectors of every run this collector has seen, fed each batch in the batch's
    transaction, after catching up from the store on what they missed."""

    def __init__(self, db: Database, series: SeriesStore, factory: DetectorFactory | None = None):
        self.series = series
        self._factory = factory or default_detectors
        self._runs: dict[str, _RunDetectors] = {}
        self._lock = threading.Lock()
        db.on_forget(self.forget)

    def forget(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def run(
        self, conn: Connection, run_id: str, rank: int, seq: int | None, steps: np.ndarray, columns: SeriesColumns
    ) -> list[AlertEvent]:
        """The alert transitions of one batch (its records' steps and columns), in record order."""
        if not len(steps):
            return []
        events: list[AlertEvent] = []
        for det in self._detectors_for(conn, run_id, rank, int(steps.min()), seq):
            events.extend(det.update_columns(steps, columns, rank))
        self._fed(run_id, rank, int(steps.max()), seq)
        return events

    def _detectors_for(
        self, conn: Connection, run_id: str, rank: int, first_step: int, seq: int | None = None
    ) -> list[Detector]:
        """The run's detectors, caught up on rank ``rank`` up to (not including) ``first_step``.
        The batch that follows the last one fed (``seq``) needs no look at the store."""
        entry = self._runs.get(run_id)
        if entry is None:
            # the run's config declares its LR schedule and planned data changes
            config = conn.execute(select(runs.c.config).where(runs.c.id == run_id)).scalar()
            entry = _RunDetectors(self._factory(config if isinstance(config, dict) else {}))
            with self._lock:
                self._runs[run_id] = entry
        fed = entry.fed.get(rank)
        if seq is not None and fed is not None and entry.seq.get(rank) == seq - 1:
            return entry.dets
        if fed is None or fed < first_step - 1:
            if self._replay(conn, run_id, rank, entry, fed, first_step) or fed is None:
                self._restore_firing(conn, run_id, rank, entry)
        return entry.dets

    def _fed(self, run_id: str, rank: int, last_step: int, seq: int | None = None) -> None:
        entry = self._runs.get(run_id)
        if entry is not None:
            entry.fed[rank] = max(entry.fed.get(rank, last_step), last_step)
            if seq is not None:
                entry.seq[rank] = seq

    def _replay(
        self, conn: Connection, run_id: str, rank: int, entry: _RunDetectors, fed: int | None, first_step: int
    ) -> int:
        """Feed the stored points the detectors missed, discarding the transitions (they were, or
        were not, recorded when those points arrived). Returns the number of records fed."""
        if not entry.names:
            return 0
        records: dict[int, dict[str, float]] = {}
        for name, sid in self.series.series_ids(conn, run_id, entry.names):
            for lo, hi in self._missed(conn, sid, rank, fed, first_step):
                got = per_rank(self.series.read_chunks(conn, sid, rank, lo, hi), lo, hi).get(rank)
                if got is None:
                    continue
                for s, v in zip(got[0].tolist(), np.asarray(got[1], dtype=np.float64).tolist()):
                    records.setdefault(s, {})[name] = v
        for step in sorted(records):
            for d in entry.dets:
                d.update(step, records[step], rank)
        return len(records)

    def _missed(self, conn: Connection, sid: int, rank: int, fed: int | None, first_step: int) -> list[tuple[int, int]]:
        """The step ranges of one series to replay: bounded reads, a long run's history is never
        decoded whole."""
        end = first_step - 1
        if fed is None:  # after a restart: where the baselines formed, and every recent window
            s0 = self.series.first_step(conn, sid, rank)
            if s0 is None:
                return []
            ranges = [(s0, min(s0 + REPLAY_HEAD - 1, end)), (max(first_step - REPLAY_TAIL, s0 + REPLAY_HEAD), end)]
        else:  # a replica that missed batches: what it missed, as far back as a rule looks
            ranges = [(max(fed + 1, first_step - REPLAY_TAIL), end)]
        return [(lo, hi) for lo, hi in ranges if lo <= hi]

    @staticmethod
    def _restore_firing(conn: Connection, run_id: str, rank: int, entry: _RunDetectors) -> None:
        """The open incidents of ``rank`` as the alerts table has them (the truth across replicas)."""
        open_ = AlertStore.firing_series(conn, run_id, rank)
        for d in entry.dets:
            d.restore_firing(rank, open_.get(d.rule, set()))

"""The ingest path, top to bottom: one batch from the wire to an answer.

validate (the API decoded it; the run must exist) → claim the batch's idempotency key (a repeat is
acknowledged, not stored) → store its chunks → run the detectors → write alerts and outbox rows →
commit → remember what the commit made true → answer. Every step runs in one transaction, under the
run's lock, so batches of one run reach the detectors in order and a failure stores nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from optiscope import wire

from .alerting import AlertStore, DetectorRunner
from .storage import Database, RankStore, RunStore, SeriesStore
from .storage.chunks import BatchColumns


@dataclass
class IngestResult:
    duplicate: bool
    points: int = 0
    alerts: list[int] = field(default_factory=list)  # ids of alerts that fired or resolved
    fired: list[str] = field(default_factory=list)  # rule of each alert that fired


class Ingestor:
    def __init__(
        self,
        db: Database,
        runs: RunStore,
        series: SeriesStore,
        ranks: RankStore,
        detection: DetectorRunner,
        alerts: AlertStore,
    ):
        self.db, self.runs, self.series, self.ranks = db, runs, series, ranks
        self.detection, self.alerts = detection, alerts

    def ingest(self, batch: wire.Columns, run_url: str = "") -> IngestResult:
        """Store one batch atomically: its chunks, new series, detector alerts and their outbox rows."""
        cols = BatchColumns(batch)
        prepared = cols.chunks()  # the numpy work, before taking the writer's turn
        with self.db.run_lock(batch.run):
            try:
                with self.db.write() as conn:
                    run = self.runs.row_for_ingest(conn, batch.run)
                    now = time.time()
                    if not self.series.claim_batch(conn, batch.run, batch.rank, batch.seq, now):
                        return IngestResult(duplicate=True)
                    # run_ranks before runs, the order mark_silent, heartbeat and finish_run lock them in:
                    # the opposite order could deadlock with another replica marking this rank crashed.
                    seen = self.ranks.touch(conn, batch.run, batch.rank, now)
                    ids = self.series.write(conn, batch.run, batch.rank, prepared)
                    self.runs.touch(conn, batch.run, now)
                    result = IngestResult(duplicate=False, points=sum(c.n for c in prepared))
                    for ev in self.detection.run(conn, batch.run, batch.rank, batch.seq, cols.steps, cols):
                        result.alerts.append(self.alerts.record(conn, run, ev, run_url, now))
                        if ev.state == "firing":
                            result.fired.append(ev.rule)
            except Exception:
                self.detection.forget(batch.run)  # its state may have moved past a rolled-back batch
                raise
        # committed: the series ids are real now, and last_seen written if it was
        if seen is not None:
            self.ranks.remember(seen)
        self.series.remember(batch.run, ids)
        return result

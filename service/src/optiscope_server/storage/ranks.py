"""The ranks of a run: finishing, heartbeats, liveness, and marking crashed the ranks that fell silent.

A rank's ``last_seen`` is written by its registration, its heartbeats and its batches; a batch
rewrites it only every ``seen_interval`` seconds (kept below a quarter of the heartbeat timeout, so
no busy rank looks silent), sparing a write per batch. The ``Reaper`` thread marks crashed the
running ranks silent for longer than the timeout; hearing from one again revives it.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import and_, select, update
from sqlalchemy.engine import Connection

from .database import Database
from .errors import NotFound
from .runs import require_run, settle
from .tables import run_ranks

log = logging.getLogger("optiscope.server")

#: (run, rank) pairs whose last write of last_seen is remembered; the least recently used leaves.
SEEN_MEMO_RANKS = 4096


class RankStore:
    def __init__(self, db: Database, seen_interval: float = 5.0):
        self.db, self.seen_interval = db, seen_interval
        # (run, rank) -> monotonic time its last_seen was last written by this replica.
        self._seen_at: collections.OrderedDict[tuple[str, int], float] = collections.OrderedDict()
        self._lock = threading.Lock()
        db.on_forget(self.forget)

    def forget(self, run_id: str) -> None:
        with self._lock:  # its next batch must reach seen(), to revive it
            for key in [k for k in self._seen_at if k[0] == run_id]:
                del self._seen_at[key]

    # -- in a batch's transaction ------------------------------------------------------------
    def touch(self, conn: Connection, run_id: str, rank: int, now: float) -> tuple[str, int] | None:
        """Note a batch from the rank, unless this replica did so within ``seen_interval``. Returns
        the key to ``remember`` once the transaction has committed (None: nothing written)."""
        key = (run_id, rank)
        with self._lock:
            last = self._seen_at.get(key, -math.inf)
        if time.monotonic() - last < self.seen_interval:
            return None
        self.seen(conn, run_id, rank, now)
        return key

    def remember(self, key: tuple[str, int]) -> None:
        with self._lock:
            self._seen_at[key] = time.monotonic()
            self._seen_at.move_to_end(key)
            while len(self._seen_at) > SEEN_MEMO_RANKS:
                self._seen_at.popitem(last=False)

    def seen(self, conn: Connection, run_id: str, rank: int, now: float) -> Any:
        """Note that a rank was heard from; a rank that silence marked crashed is running again.
        Returns the run row when the run's status may have changed (None otherwise)."""
        got = conn.execute(
            update(run_ranks)
            .where(run_ranks.c.run_id == run_id, run_ranks.c.rank == rank)
            .values(last_seen=now)
            .returning(run_ranks.c.crash_reason)
        ).first()
        if got is not None and got.crash_reason == "heartbeat":
            conn.execute(
                update(run_ranks)
                .where(run_ranks.c.run_id == run_id, run_ranks.c.rank == rank)
                .values(status="running", crash_reason=None, finished_at=None)
            )
            log.info("run %s rank %d is heard from again after being marked crashed", run_id, rank)
            return settle(conn, run_id, now)
        return None

    # -- requests ----------------------------------------------------------------------------
    def heartbeat(self, run_id: str, rank: int = 0) -> dict:
        """A registered rank is alive: note the time, and revive it if silence had marked it crashed."""
        now = time.time()
        with self.db.write() as conn:
            _registered(conn, run_id, rank)
            self.seen(conn, run_id, rank, now)
            row = settle(conn, run_id, now)
        return dict(row)

    def finish_run(self, run_id: str, status: str, rank: int = 0) -> dict:
        """Mark a registered rank finished or crashed (reported by the SDK); returns the run's row."""
        now = time.time()
        reason = "reported" if status == "crashed" else None
        with self.db.write() as conn:
            _registered(conn, run_id, rank)
            conn.execute(
                update(run_ranks)
                .where(run_ranks.c.run_id == run_id, run_ranks.c.rank == rank)
                .values(status=status, finished_at=now, last_seen=now, crash_reason=reason)
            )
            row = settle(conn, run_id, now)
        if row["status"] != "running":
            # A finished run sends no more batches (a late one restores the state from the store).
            self.db.forget(run_id)
        return dict(row)

    def mark_silent(self, timeout: float, now: float | None = None) -> list[str]:
        """Mark crashed every running rank not heard from for ``timeout`` seconds (its process died
        without a word: killed, out of memory, the node lost); returns the runs that changed. Safe on
        every replica at once: the update re-checks the silence in its WHERE."""
        now = time.time() if now is None else now
        silent = and_(run_ranks.c.status == "running", run_ranks.c.last_seen < now - timeout)
        with self.db.read() as conn:
            ids = sorted({r for (r,) in conn.execute(select(run_ranks.c.run_id).where(silent))})
        changed = []
        for run_id in ids:
            with self.db.run_lock(run_id), self.db.write() as conn:
                n = conn.execute(
                    update(run_ranks)
                    .where(run_ranks.c.run_id == run_id, silent)
                    .values(status="crashed", crash_reason="heartbeat", finished_at=now)
                ).rowcount
                if n:
                    row = settle(conn, run_id, now)
                    changed.append(run_id)
                    log.warning(
                        "run %s: %d rank(s) silent for %.0f s, marked crashed (now %s)",
                        run_id,
                        n,
                        timeout,
                        row["status"],
                    )
            self.db.forget(run_id)
        return changed


def _registered(conn: Connection, run_id: str, rank: int) -> None:
    """404 unless the run exists and the rank registered in it: a heartbeat or an end names a rank,
    it never creates one (ranks go up to 2**31 - 1)."""
    require_run(conn, run_id)
    known = select(run_ranks.c.rank).where(run_ranks.c.run_id == run_id, run_ranks.c.rank == rank)
    if conn.execute(known).first() is None:
        raise NotFound(f"{run_id} has no rank {rank}: a rank registers (PUT the run) before it sends")


class Reaper:
    """Marks crashed the ranks silent for longer than the heartbeat timeout, from a thread of its own."""

    def __init__(self, ranks: RankStore, timeout: float, on_crash: Callable[[], None]):
        self.ranks, self.timeout, self.on_crash = ranks, timeout, on_crash
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="optiscope-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(min(15.0, self.timeout / 4)):
            if time.monotonic() - started < self.timeout:
                # Nobody could reach a collector that was down: give every rank one full timeout
                # from our start to be heard from before silence counts against it.
                continue
            try:
                for _ in self.ranks.mark_silent(self.timeout):
                    self.on_crash()
            except Exception:  # the next round tries again
                log.warning("heartbeat check failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

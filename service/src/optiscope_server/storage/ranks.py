"""Run lifecycle: finishing ranks, heartbeats, and marking crashed the ranks that fell silent.

Mixed into ``Store``: it uses the store's engine, writer lock, per-run locks and ``_settle``.
"""
from __future__ import annotations

import json
import logging
import threading
import time

from sqlalchemy import and_, select, update
from sqlalchemy.engine import Connection

from .db import run_ranks, runs
from .errors import NotFound

log = logging.getLogger("optiscope.server")


class Lifecycle:
    def heartbeat(self, run_id: str, rank: int = 0) -> dict:
        """A rank is alive: note the time, and revive it if silence had marked it crashed."""
        now = time.time()
        with self._writer, self.engine.begin() as conn:
            if conn.execute(select(runs.c.id).where(runs.c.id == run_id)).first() is None:
                raise NotFound(run_id)
            row = self._seen(conn, run_id, rank, now, register=True)
        return dict(row)

    def _seen(self, conn: Connection, run_id: str, rank: int, now: float, register: bool = False):
        """Note that a rank was heard from; a rank that silence marked crashed is running again.
        Returns the run row when ``register`` or when the run's status may have changed."""
        got = conn.execute(update(run_ranks).where(run_ranks.c.run_id == run_id, run_ranks.c.rank == rank)
                           .values(last_seen=now).returning(run_ranks.c.crash_reason)).first()
        if got is None and register:
            conn.execute(run_ranks.insert().values(run_id=run_id, rank=rank, status="running", started_at=now,
                                                   last_seen=now))
        elif got is not None and got.crash_reason == "heartbeat":
            conn.execute(update(run_ranks).where(run_ranks.c.run_id == run_id, run_ranks.c.rank == rank)
                         .values(status="running", crash_reason=None, finished_at=None))
            log.info("run %s rank %d is heard from again after being marked crashed", run_id, rank)
            return self._settle(conn, run_id, now)
        return self._settle(conn, run_id, now) if register else None

    def mark_silent(self, timeout: float, now: float | None = None) -> list[str]:
        """Mark crashed every running rank not heard from for ``timeout`` seconds (its process died
        without a word: killed, out of memory, the node lost); returns the runs that changed. Safe on
        every replica at once: the update re-checks the silence in its WHERE."""
        now = time.time() if now is None else now
        cutoff = now - timeout
        silent = and_(run_ranks.c.status == "running", run_ranks.c.last_seen < cutoff)
        with self.engine.connect() as conn:
            ids = sorted({r for (r,) in conn.execute(select(run_ranks.c.run_id).where(silent))})
        changed = []
        for run_id in ids:
            with self._run_lock(run_id), self._writer, self.engine.begin() as conn:
                n = conn.execute(update(run_ranks).where(run_ranks.c.run_id == run_id, silent)
                                 .values(status="crashed", crash_reason="heartbeat", finished_at=now)).rowcount
                if n:
                    row = self._settle(conn, run_id, now)
                    changed.append(run_id)
                    log.warning("run %s: %d rank(s) silent for %.0f s, marked crashed (now %s)", run_id, n, timeout,
                                row["status"])
            self._detectors.pop(run_id, None)
            with self._cache_lock:  # its next batch must reach _seen, to revive it
                for key in [k for k in self._seen_at if k[0] == run_id]:
                    del self._seen_at[key]
        return changed

    def _settle(self, conn: Connection, run_id: str, now: float):
        """The run's status from its ranks': crashed if one crashed, finished when all finished."""
        states = {s for (s,) in conn.execute(select(run_ranks.c.status).where(run_ranks.c.run_id == run_id))}
        status = "crashed" if "crashed" in states else "running" if "running" in states or not states else "finished"
        current = conn.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar_one_or_none()
        if current is not None and current != status:
            conn.execute(update(runs).where(runs.c.id == run_id).values(
                status=status, updated_at=now, finished_at=None if status == "running" else now))
        return conn.execute(select(runs).where(runs.c.id == run_id)).mappings().first()

    def finish_run(self, run_id: str, status: str, rank: int = 0) -> dict:
        now = time.time()
        reason = "reported" if status == "crashed" else None
        with self._writer, self.engine.begin() as conn:
            if conn.execute(select(runs.c.id).where(runs.c.id == run_id)).first() is None:
                raise NotFound(run_id)
            ins = self._insert(run_ranks).values(run_id=run_id, rank=rank, status=status, started_at=now,
                                                 finished_at=now, last_seen=now, crash_reason=reason)
            conn.execute(ins.on_conflict_do_update(index_elements=["run_id", "rank"], set_={
                "status": status, "finished_at": now, "last_seen": now, "crash_reason": reason}))
            row = self._settle(conn, run_id, now)
        if row["status"] != "running":
            # A finished run sends no more batches (a late one restores the state from the store).
            self._detectors.pop(run_id, None)
        return dict(row)


class Reaper:
    """Marks crashed the ranks silent for longer than the heartbeat timeout, from a thread of its own."""

    def __init__(self, store, timeout: float, on_crash):
        self.store, self.timeout, self.on_crash = store, timeout, on_crash
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
                for _ in self.store.mark_silent(self.timeout):
                    self.on_crash()
            except Exception:  # the next round tries again
                log.warning("heartbeat check failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def environment_differences(envs: list[dict]) -> list[str]:
    """Top-level environment keys (``packages.torch`` one level down for dicts) whose values are not
    the same on every rank that reported one; host and pid are expected to differ and are left out."""
    if len(envs) < 2:
        return []
    keys: set[str] = set()
    for env in envs:
        for k, v in env.items():
            keys.update(f"{k}.{k2}" for k2 in v) if isinstance(v, dict) else keys.add(k)
    def get(env, key):
        top, _, sub = key.partition(".")
        v = env.get(top)
        return v.get(sub) if sub and isinstance(v, dict) else v
    ignore = {"host", "pid"}
    return sorted(k for k in keys if k not in ignore and len({json.dumps(get(e, k), sort_keys=True) for e in envs}) > 1)

"""One database: the engine, the dialect's upsert, SQLite's single writer, per-run locks.

Every store of the collector (runs, series, ranks, alerts, audit) is a small object around one
``Database``; none of them owns a connection. A write is ``with db.write() as conn:`` (one
transaction, taking SQLite's writer turn), a read is ``with db.read() as conn:``. Stores that keep
a memo of a run (the series catalog, liveness, detector state) register a ``forget`` hook, so that
deleting a run or seeing it end clears every memo at once, whoever holds it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from .migrate import upgrade

log = logging.getLogger("optiscope.server")

#: Striped per-run locks: batches of one run are ingested one at a time (detector order), in bounded
#: memory however many runs a collector sees.
RUN_LOCK_STRIPES = 64


class Database:
    def __init__(self, url: str, migrate: bool = True):
        self.url = url
        self.engine: Engine = make_engine(url, migrate=migrate)
        self.dialect: str = self.engine.dialect.name
        self.insert: Callable[..., Any] = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        # SQLite has one writer at a time; queueing writers here instead of in SQLite's busy handler
        # (which sleeps up to 100 ms between tries) keeps the batch latency even.
        self.writer: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if self.dialect == "sqlite" else contextlib.nullcontext()
        )
        #: SQLite: the thread that checkpoints the write-ahead log (None on PostgreSQL).
        self.checkpointer = Checkpointer(self.engine, self.writer) if self.dialect == "sqlite" else None
        self._run_locks = [threading.Lock() for _ in range(RUN_LOCK_STRIPES)]
        self._forget: list[Callable[[str], None]] = []

    @staticmethod
    def insert_for(conn: Connection) -> Callable[..., Any]:
        """The dialect's INSERT with ON CONFLICT, for code that holds only a connection."""
        return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction (SQLite: in the writer's turn)."""
        with self.writer, self.engine.begin() as conn:
            yield conn

    def read(self) -> contextlib.AbstractContextManager[Connection]:
        return self.engine.connect()

    def run_lock(self, run_id: str) -> threading.Lock:
        return self._run_locks[hash(run_id) % len(self._run_locks)]

    def on_forget(self, hook: Callable[[str], None]) -> None:
        """``hook(run_id)`` drops whatever a store remembers of a run (see ``forget``)."""
        self._forget.append(hook)

    def forget(self, run_id: str) -> None:
        """The run was deleted, ended, or its state may have moved past the store (a rolled-back
        batch, a rank marked crashed): every memo of it is dropped and rebuilt from the store."""
        for hook in self._forget:
            hook(run_id)

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.stop()
        self.engine.dispose()


def make_engine(url: str, migrate: bool = True) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA cache_size=-32768")  # 32 MiB: the chunk index of a long run stays in memory
            # No checkpoint inside a commit: its fsync grows with the file (tens of ms, then hundreds)
            # and would land on whichever batch happened to cross the threshold. Checkpointer does it.
            cur.execute("PRAGMA wal_autocheckpoint=0")
            cur.close()
    else:
        engine = create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True)
    if migrate:
        upgrade(engine)
    return engine


class Checkpointer:
    """SQLite only: copies the write-ahead log into the database file from a thread of its own, so
    commits never wait for it. A passive checkpoint runs beside the writer; when the log has grown
    past ``max_wal_pages`` anyway (the writer never paused), the rest is checkpointed and the log
    restarted while holding ``writer``, which bounds the log at a short pause for the writer."""

    def __init__(
        self,
        engine: Engine,
        writer: contextlib.AbstractContextManager[Any],
        interval: float = 0.5,
        max_wal_pages: int = 16384,
    ):
        self.engine, self.writer, self.interval, self.max_wal_pages = engine, writer, interval, max_wal_pages
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="optiscope-checkpoint", daemon=True)
        self._thread.start()

    def checkpoint(self) -> None:
        with self.engine.connect() as conn:
            _busy, log_pages, _done = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
            if log_pages > self.max_wal_pages:
                with self.writer:
                    conn.exec_driver_sql("PRAGMA wal_checkpoint(RESTART)").one()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.checkpoint()
            except Exception:  # the next round tries again; a failing disk shows in the commits
                log.warning("WAL checkpoint failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        with self.writer, self.engine.connect() as conn:  # leave a short log behind
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()

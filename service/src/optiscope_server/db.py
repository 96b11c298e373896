"""Schema and engine: one code path for SQLite (WAL) and PostgreSQL through SQLAlchemy 2."""
from __future__ import annotations

import logging
import math
import sys
import threading
from array import array

from sqlalchemy import (BigInteger, Column, Double, ForeignKey, Index, Integer, LargeBinary, MetaData, String,
                        Table, Text, UniqueConstraint, create_engine, event, inspect, text)
from sqlalchemy.engine import Engine
from sqlalchemy.types import JSON, TypeDecorator

log = logging.getLogger("optiscope.server")


class Value(TypeDecorator):
    """A float64 metric value in which NaN survives storage.

    SQLite silently turns a bound NaN into NULL, so NULL is the one encoding of NaN on every
    backend (values are never otherwise NULL). +-Inf are stored natively by both backends.
    """

    impl = Double
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None or math.isnan(value):
            return None
        return float(value)

    def process_result_value(self, value, dialect):
        return math.nan if value is None else float(value)


metadata = MetaData()

runs = Table(
    "runs", metadata,
    Column("id", String(64), primary_key=True),
    Column("project", String(200), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("status", String(16), nullable=False),  # running | finished | crashed
    Column("config", JSON, nullable=False),
    Column("host", String(255)),
    Column("created_at", Double, nullable=False),   # unix seconds
    Column("updated_at", Double, nullable=False),   # last ingest or state change
    Column("finished_at", Double),
)

# The processes of one run (data-parallel ranks): a run is finished once every rank that
# registered has finished, and crashed as soon as one rank crashed.
run_ranks = Table(
    "run_ranks", metadata,
    Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("rank", Integer, primary_key=True),
    Column("status", String(16), nullable=False),  # running | finished | crashed
    Column("host", String(255)),
    Column("started_at", Double, nullable=False),
    Column("finished_at", Double),
)

series = Table(
    "series", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(200), nullable=False),
    UniqueConstraint("run_id", "name", name="uq_series_run_name"),
)

# The points of one series from one stored batch (one rank): a chunk. One row per series and batch
# instead of one per point is what makes ingest cheap (a batch of 300 series x 100 steps is 300
# rows, not 30,000) while a series' history is still one index range. A point written again at the
# same (series, rank, step) is not updated in place: reads let the newest chunk win (chunks.c.id is
# the order of storage) and, within a chunk, the later record.
chunks = Table(
    "chunks", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("series_id", Integer, ForeignKey("series.id", ondelete="CASCADE"), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("step_min", BigInteger, nullable=False),
    Column("step_max", BigInteger, nullable=False),
    # The value at step_max (the later one if the chunk holds that step twice): the newest point of
    # a series is one index lookup, for /metrics and run summaries, without reading a blob.
    Column("last_value", Value),
    Column("steps", LargeBinary),                # int64 little-endian; NULL: every step from step_min to step_max
    Column("vals", LargeBinary, nullable=False),  # float64 little-endian, one per step: NaN and +-Inf bit-exact
    # Range queries and "newest chunk of a series" both walk this index.
    Index("ix_chunks_series_step", "series_id", "step_max", "id"),
)

# Idempotency keys of stored batches: a repeat of (run, rank, seq) is acknowledged, not stored.
batches = Table(
    "batches", metadata,
    Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("rank", Integer, primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("received_at", Double, nullable=False),
)

alerts = Table(
    "alerts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("rule", String(64), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("state", String(16), nullable=False),  # firing | resolved
    Column("series", String(200), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("value", Value),
    Column("message", Text, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("resolved_at", Double),
    Column("resolved_step", BigInteger),
)

# Transactional outbox: a webhook delivery is written in the same transaction as its alert, so a
# crash between detection and delivery loses nothing; the dispatcher sends and marks it.
outbox = Table(
    "outbox", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("alert_id", Integer, ForeignKey("alerts.id", ondelete="CASCADE"), nullable=False),
    Column("target", Text, nullable=False),
    Column("payload", Text, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Double, nullable=False),
    Column("delivered_at", Double),
    Column("last_error", Text),
    Index("ix_outbox_pending", "delivered_at", "next_attempt_at"),
)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")      # readers never block the writer
            cur.execute("PRAGMA synchronous=NORMAL")    # durable across process crashes in WAL mode
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA cache_size=-32768")      # 32 MiB: the chunk index of a long run stays in memory
            # No checkpoint inside a commit: its fsync grows with the file (tens of ms, then hundreds)
            # and would land on whichever batch happened to cross the threshold. Checkpointer does it.
            cur.execute("PRAGMA wal_autocheckpoint=0")
            cur.close()
    else:
        engine = create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True)
    metadata.create_all(engine)
    _migrate_points(engine)
    return engine


class Checkpointer:
    """SQLite only: copies the write-ahead log into the database file from a thread of its own, so
    commits never wait for it. A passive checkpoint runs beside the writer; when the log has grown
    past ``max_wal_pages`` anyway (the writer never paused), the rest is checkpointed and the log
    restarted while holding ``writer``, which bounds the log at a short pause for the writer."""

    def __init__(self, engine: Engine, writer: threading.Lock, interval: float = 0.5, max_wal_pages: int = 16384):
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


def _migrate_points(engine: Engine, per_chunk: int = 100_000) -> None:
    """A database written before chunked storage holds one row per point in ``points``: move them
    into chunks, once, in one transaction, so no history disappears on upgrade."""
    if not inspect(engine).has_table("points"):
        return
    with engine.begin() as conn:
        keys = conn.execute(text("SELECT DISTINCT series_id, rank FROM points")).all()
        for sid, rank in keys:  # one series and rank in memory at a time
            got = conn.execute(text("SELECT step, value FROM points WHERE series_id = :s AND rank = :r ORDER BY step"),
                               {"s": sid, "r": rank}).all()
            for i in range(0, len(got), per_chunk):
                steps = array("q", (st for st, _ in got[i:i + per_chunk]))
                vals = array("d", (math.nan if v is None else v for _, v in got[i:i + per_chunk]))  # NULL was NaN
                conn.execute(chunks.insert().values(
                    series_id=sid, rank=rank, step_min=steps[0], step_max=steps[-1], last_value=vals[-1],
                    steps=None if steps[-1] - steps[0] == len(steps) - 1 else _le_bytes(steps), vals=_le_bytes(vals)))
        conn.execute(text("DROP TABLE points"))


def _le_bytes(a: array) -> bytes:
    if sys.byteorder != "little":
        a = array(a.typecode, a)
        a.byteswap()
    return a.tobytes()

"""Schema and engine: one code path for SQLite (WAL) and PostgreSQL through SQLAlchemy 2."""
from __future__ import annotations

import math

from sqlalchemy import (BigInteger, Column, Double, ForeignKey, Index, Integer, MetaData, String, Table, Text,
                        UniqueConstraint, create_engine, event)
from sqlalchemy.engine import Engine
from sqlalchemy.types import JSON, TypeDecorator


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

series = Table(
    "series", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(200), nullable=False),
    # The newest point, kept at ingest: /metrics and run summaries read it without a scan.
    Column("last_step", BigInteger),
    Column("last_value", Value),
    UniqueConstraint("run_id", "name", name="uq_series_run_name"),
)

points = Table(
    "points", metadata,
    Column("series_id", Integer, ForeignKey("series.id", ondelete="CASCADE"), primary_key=True),
    Column("rank", Integer, primary_key=True),
    Column("step", BigInteger, primary_key=True),
    Column("value", Value),
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
            cur.close()
    else:
        engine = create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True)
    metadata.create_all(engine)
    return engine

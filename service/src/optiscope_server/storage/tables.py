"""The schema: every table of the collector's database, one definition for SQLite and PostgreSQL."""

from __future__ import annotations

import math

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
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
    "runs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("project", String(200), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("status", String(16), nullable=False),  # running | finished | crashed
    Column("config", JSON, nullable=False),
    Column("host", String(255)),
    Column("created_at", Double, nullable=False),  # unix seconds
    Column("updated_at", Double, nullable=False),  # last ingest or state change
    Column("finished_at", Double),
)

# A project is created by the first run registered in it (or the first token made for it); its
# name is what runs, tokens and the audit log refer to.
projects = Table(
    "projects",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("created_at", Double, nullable=False),
)

# Tags of a run, one row each: "runs tagged x" is one index range on every backend, where a JSON
# array would need a dialect's own containment operator.
run_tags = Table(
    "run_tags",
    metadata,
    Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("tag", String(100), primary_key=True),
    Index("ix_run_tags_tag", "tag", "run_id"),
)

# The processes of one run (data-parallel ranks): a run is finished once every rank that
# registered has finished, and crashed as soon as one rank crashed.
run_ranks = Table(
    "run_ranks",
    metadata,
    Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("rank", Integer, primary_key=True),
    Column("status", String(16), nullable=False),  # running | finished | crashed
    Column("host", String(255)),
    Column("started_at", Double, nullable=False),
    Column("finished_at", Double),
    # Each process reports its own environment (host, library versions, devices): the ranks of one
    # run are meant to be alike, and a rank that differs is worth seeing.
    Column("environment", JSON),
    # When the collector last heard from the rank (registration, batch, heartbeat): a running rank
    # silent for longer than the heartbeat timeout is marked crashed.
    Column("last_seen", Double),
    Column("crash_reason", String(16)),  # reported (by the SDK) | heartbeat (silent too long)
)

series = Table(
    "series",
    metadata,
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
    "chunks",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("series_id", Integer, ForeignKey("series.id", ondelete="CASCADE"), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("step_min", BigInteger, nullable=False),
    Column("step_max", BigInteger, nullable=False),
    # The value at step_max (the later one if the chunk holds that step twice): the newest point of
    # a series is one index lookup, for /metrics and run summaries, without reading a blob.
    Column("last_value", Value),
    Column("steps", LargeBinary),  # int64 little-endian; NULL: every step from step_min to step_max
    Column("vals", LargeBinary, nullable=False),  # float64 little-endian, one per step: NaN and +-Inf bit-exact
    # Range queries and "newest chunk of a series" both walk this index.
    Index("ix_chunks_series_step", "series_id", "step_max", "id"),
)

# Idempotency keys of stored batches: a repeat of (run, rank, seq) is acknowledged, not stored.
batches = Table(
    "batches",
    metadata,
    Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("rank", Integer, primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("received_at", Double, nullable=False),
)

alerts = Table(
    "alerts",
    metadata,
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
    # what triggered it (AlertEvent.evidence): window, values, thresholds; JSON-safe by construction
    Column("evidence", JSON),
    Column("created_at", Double, nullable=False),
    Column("resolved_at", Double),
    Column("resolved_step", BigInteger),
    # Acknowledged is orthogonal to firing/resolved: someone has seen the alert and owns it.
    Column("acknowledged_at", Double),
    Column("acknowledged_by", String(200)),
    Column("ack_note", Text),
)

# Where alerts go. ``project`` None: every project's alerts (made by the root token or from the
# command line, ``source`` config). Secrets sign each delivery (Standard Webhooks); several during a
# rotation, newest first. An endpoint that answers 410 Gone is disabled, not retried.
webhooks = Table(
    "webhooks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("url", Text, nullable=False),
    Column("format", String(16), nullable=False),  # native | slack | alertmanager
    Column("project", String(200)),
    Column("secrets", JSON),  # ["whsec_...", ...], newest first; None: unsigned
    Column("source", String(16), nullable=False),  # api | config
    Column("created_at", Double, nullable=False),
    Column("created_by", String(200)),
    Column("disabled_at", Double),
    Column("disabled_reason", Text),
)

# Transactional outbox: a webhook delivery is written in the same transaction as its alert, so a
# crash between detection and delivery loses nothing; the dispatcher sends and marks it.
outbox = Table(
    "outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("alert_id", Integer, ForeignKey("alerts.id", ondelete="CASCADE"), nullable=False),
    Column("webhook_id", Integer, ForeignKey("webhooks.id", ondelete="CASCADE")),
    Column("msg_id", String(64)),  # the webhook-id header: the same on every retry of this delivery
    Column("target", Text, nullable=False),
    Column("payload", Text, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Double, nullable=False),
    Column("delivered_at", Double),
    Column("last_error", Text),
    Index("ix_outbox_pending", "delivered_at", "next_attempt_at"),
)


# API tokens: ``osk_<id>_<secret>``. Only a SHA-256 of the whole token is kept: the secret is 256
# random bits, so a fast hash is as good as a slow one and costs nothing per request.
tokens = Table(
    "tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("project", String(200), nullable=False, index=True),
    Column("scopes", String(64), nullable=False),  # comma-separated: ingest, read, admin
    Column("secret_hash", String(64), nullable=False),
    Column("created_at", Double, nullable=False),
    Column("created_by", String(200)),
    Column("revoked_at", Double),
    Column("last_used_at", Double),
)

# Administrative actions (tokens, acknowledgements, deletions): who did what to which object, when.
# Never deleted with the runs or projects it mentions.
audit = Table(
    "audit",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("at", Double, nullable=False),
    Column("actor", String(200), nullable=False),
    Column("action", String(64), nullable=False),
    Column("project", String(200)),
    Column("target", String(200)),
    Column("detail", JSON),
    Column("remote", String(100)),
    Index("ix_audit_project_id", "project", "id"),
)

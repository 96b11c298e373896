"""Baseline: the schema as it was before migrations (created then by ``create_all``).

A database made by an earlier collector already holds these tables and has no ``alembic_version``:
creating each table only where it is missing makes this first step the same for a new database and
for an old one. A database older still, with one row per point in ``points``, has them moved into
chunks here, once, so no history disappears on upgrade.

Revision ID: 0001
Revises:
"""

import math
import sys
from array import array

import sqlalchemy as sa
from alembic import op
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

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


class _Value(sa.types.TypeDecorator):  # frozen copy of db.Value: NaN is stored as NULL
    impl = Double
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None or math.isnan(value) else float(value)


def _schema() -> MetaData:
    """The tables of this revision, frozen here: later changes to the models must not change what
    this step creates."""
    md = MetaData()
    Table(
        "runs",
        md,
        Column("id", String(64), primary_key=True),
        Column("project", String(200), nullable=False, index=True),
        Column("name", String(200), nullable=False),
        Column("status", String(16), nullable=False),
        Column("config", sa.JSON, nullable=False),
        Column("host", String(255)),
        Column("created_at", Double, nullable=False),
        Column("updated_at", Double, nullable=False),
        Column("finished_at", Double),
    )
    Table(
        "run_ranks",
        md,
        Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        Column("rank", Integer, primary_key=True),
        Column("status", String(16), nullable=False),
        Column("host", String(255)),
        Column("started_at", Double, nullable=False),
        Column("finished_at", Double),
    )
    Table(
        "series",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        Column("name", String(200), nullable=False),
        UniqueConstraint("run_id", "name", name="uq_series_run_name"),
    )
    Table(
        "chunks",
        md,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("series_id", Integer, ForeignKey("series.id", ondelete="CASCADE"), nullable=False),
        Column("rank", Integer, nullable=False),
        Column("step_min", BigInteger, nullable=False),
        Column("step_max", BigInteger, nullable=False),
        Column("last_value", _Value),
        Column("steps", LargeBinary),
        Column("vals", LargeBinary, nullable=False),
        Index("ix_chunks_series_step", "series_id", "step_max", "id"),
    )
    Table(
        "batches",
        md,
        Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        Column("rank", Integer, primary_key=True),
        Column("seq", BigInteger, primary_key=True),
        Column("received_at", Double, nullable=False),
    )
    Table(
        "alerts",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False, index=True),
        Column("rule", String(64), nullable=False),
        Column("severity", String(16), nullable=False),
        Column("state", String(16), nullable=False),
        Column("series", String(200), nullable=False),
        Column("rank", Integer, nullable=False),
        Column("step", BigInteger, nullable=False),
        Column("value", _Value),
        Column("message", Text, nullable=False),
        Column("created_at", Double, nullable=False),
        Column("resolved_at", Double),
        Column("resolved_step", BigInteger),
    )
    Table(
        "outbox",
        md,
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
    return md


def upgrade() -> None:
    conn = op.get_bind()
    md = _schema()
    md.create_all(conn, checkfirst=True)
    if sa.inspect(conn).has_table("points"):
        _points_to_chunks(conn, md.tables["chunks"])


def _points_to_chunks(conn, chunks, per_chunk: int = 100_000) -> None:
    keys = conn.execute(sa.text("SELECT DISTINCT series_id, rank FROM points")).all()
    for sid, rank in keys:  # one series and rank in memory at a time
        got = conn.execute(
            sa.text("SELECT step, value FROM points WHERE series_id = :s AND rank = :r ORDER BY step"),
            {"s": sid, "r": rank},
        ).all()
        for i in range(0, len(got), per_chunk):
            steps = array("q", (st for st, _ in got[i : i + per_chunk]))
            vals = array("d", (math.nan if v is None else v for _, v in got[i : i + per_chunk]))  # NULL was NaN
            conn.execute(
                chunks.insert().values(
                    series_id=sid,
                    rank=rank,
                    step_min=steps[0],
                    step_max=steps[-1],
                    last_value=vals[-1],
                    steps=None if steps[-1] - steps[0] == len(steps) - 1 else _le_bytes(steps),
                    vals=_le_bytes(vals),
                )
            )
    conn.execute(sa.text("DROP TABLE points"))


def _le_bytes(a: array) -> bytes:
    if sys.byteorder != "little":
        a = array(a.typecode, a)
        a.byteswap()
    return a.tobytes()


def downgrade() -> None:
    raise NotImplementedError("the baseline is not undone: delete the database instead")

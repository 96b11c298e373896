"""Projects, tags, per-rank environment and heartbeat, alert acknowledgement, tokens, audit log.

Revision ID: 0002
Revises: 0001
"""

import time

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.execute("INSERT INTO projects (name, created_at) SELECT project, MIN(created_at) FROM runs GROUP BY project")
    op.create_table(
        "run_tags",
        sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("tag", sa.String(100), primary_key=True),
    )
    op.create_index("ix_run_tags_tag", "run_tags", ["tag", "run_id"])
    with op.batch_alter_table("run_ranks") as t:
        t.add_column(sa.Column("environment", sa.JSON))
        t.add_column(sa.Column("last_seen", sa.Double))
        t.add_column(sa.Column("crash_reason", sa.String(16)))
    # Ranks running when the collector is upgraded get a full heartbeat timeout from now to be heard
    # from, rather than being declared crashed for the time the old collector did not track.
    op.execute(sa.text("UPDATE run_ranks SET last_seen = :now").bindparams(now=time.time()))
    with op.batch_alter_table("alerts") as t:
        t.add_column(sa.Column("acknowledged_at", sa.Double))
        t.add_column(sa.Column("acknowledged_by", sa.String(200)))
        t.add_column(sa.Column("ack_note", sa.Text))
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("project", sa.String(200), nullable=False),
        sa.Column("scopes", sa.String(64), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("created_by", sa.String(200)),
        sa.Column("revoked_at", sa.Double),
        sa.Column("last_used_at", sa.Double),
    )
    op.create_index("ix_tokens_project", "tokens", ["project"])
    op.create_table(
        "audit",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Double, nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("project", sa.String(200)),
        sa.Column("target", sa.String(200)),
        sa.Column("detail", sa.JSON),
        sa.Column("remote", sa.String(100)),
    )
    op.create_index("ix_audit_project_id", "audit", ["project", "id"])


def downgrade() -> None:
    op.drop_table("audit")
    op.drop_table("tokens")
    with op.batch_alter_table("alerts") as t:
        t.drop_column("ack_note")
        t.drop_column("acknowledged_by")
        t.drop_column("acknowledged_at")
    with op.batch_alter_table("run_ranks") as t:
        t.drop_column("crash_reason")
        t.drop_column("last_seen")
        t.drop_column("environment")
    op.drop_table("run_tags")
    op.drop_table("projects")

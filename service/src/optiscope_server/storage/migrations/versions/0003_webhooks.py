"""Webhook endpoints as objects (format, project, signing secrets, disabled on 410), and each
outbox delivery's webhook and message id.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhooks",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("project", sa.String(200)),
        sa.Column("secrets", sa.JSON),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("created_by", sa.String(200)),
        sa.Column("disabled_at", sa.Double),
        sa.Column("disabled_reason", sa.Text),
    )
    with op.batch_alter_table("outbox") as t:
        t.add_column(sa.Column("webhook_id", sa.Integer))
        t.add_column(sa.Column("msg_id", sa.String(64)))
        t.create_foreign_key("fk_outbox_webhook", "webhooks", ["webhook_id"], ["id"], ondelete="CASCADE")


def downgrade() -> None:
    with op.batch_alter_table("outbox") as t:
        t.drop_constraint("fk_outbox_webhook", type_="foreignkey")
        t.drop_column("msg_id")
        t.drop_column("webhook_id")
    op.drop_table("webhooks")

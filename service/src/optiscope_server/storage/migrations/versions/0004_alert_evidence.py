"""Each alert's evidence (the window, values and thresholds that triggered it), as JSON.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("alerts") as t:
        t.add_column(sa.Column("evidence", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("alerts") as t:
        t.drop_column("evidence")

"""functions runtime: invocation observability columns and tumbling-window state

Revision ID: 0002_functions
Revises: 0001
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_functions"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("fn_invocations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("worker", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("records_failed", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("records_filtered", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("iterator_age_ms", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("log", sa.Text(), nullable=True))
    op.create_table(
        "fn_window_state",
        sa.Column("consumer_group", sa.String(length=128), nullable=False),
        sa.Column("topic", sa.String(length=255), nullable=False),
        sa.Column("partition", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("window_start_ms", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("consumer_group", "topic", "partition"),
    )


def downgrade() -> None:
    op.drop_table("fn_window_state")
    with op.batch_alter_table("fn_invocations", schema=None) as batch_op:
        for name in ("log", "iterator_age_ms", "records_filtered", "records_failed", "worker"):
            batch_op.drop_column(name)

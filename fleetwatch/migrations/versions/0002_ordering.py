"""ordering: lifecycle columns, part replacements, API tokens, webhook deliveries

Revision ID: 0002_ordering
Revises: 0001
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_ordering"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)
NEW_ORDER_COLUMNS = [
    ("signal", sa.String(length=64)), ("lead_time_h", sa.Float()), ("cancel_code", sa.String(length=32)),
    ("acknowledged_at", TS), ("shipped_at", TS), ("installed_at", TS), ("cancelled_at", TS),
]


def upgrade() -> None:
    for name, type_ in NEW_ORDER_COLUMNS:
        op.add_column("orders", sa.Column(name, type_, nullable=True))
    op.create_index("ix_orders_placed_at", "orders", ["placed_at"])
    op.create_index("ix_orders_priority", "orders", ["priority", "placed_at"])
    op.create_table(
        "part_replacements",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("tractor_id", sa.String(length=32), nullable=False),
        sa.Column("part_id", sa.String(length=64), nullable=False),
        sa.Column("order_id", sa.BigInteger(), sa.ForeignKey("orders.id"), nullable=True),
        sa.Column("installed_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_part_replacements_tractor_part", "part_replacements",
                    ["tractor_id", "part_id", "installed_at"])
    op.create_table(
        "api_tokens",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False, unique=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "order_webhooks",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("order_id", sa.BigInteger(), sa.ForeignKey("orders.id"), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("delivered_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_order_webhooks_due", "order_webhooks", ["status", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_order_webhooks_due", table_name="order_webhooks")
    op.drop_table("order_webhooks")
    op.drop_table("api_tokens")
    op.drop_index("ix_part_replacements_tractor_part", table_name="part_replacements")
    op.drop_table("part_replacements")
    op.drop_index("ix_orders_priority", table_name="orders")
    op.drop_index("ix_orders_placed_at", table_name="orders")
    with op.batch_alter_table("orders") as batch:
        for name, _ in reversed(NEW_ORDER_COLUMNS):
            batch.drop_column(name)

"""trends: split the detector's state into slow and per-batch parts, with a generation for worker caches

``live`` holds what changes with every sample (watermark, dedupe bitmap, open windows); ``state`` keeps the rest
(trends, condition regression, episodes), rewritten only when a window closes. ``generation`` is a random token
set on every write, so a worker can tell that its cached copy of a row is still the stored one.

Revision ID: 0003_trends_state
Revises: 0002_trends
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_trends_state"
down_revision: str | None = "0002_trends"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("trend_state") as batch:
        batch.add_column(sa.Column("live", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("generation", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("trend_state") as batch:
        batch.drop_column("generation")
        batch.drop_column("live")

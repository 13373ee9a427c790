"""trends: window and health columns, analyst views, indexes for large trend tables

Revision ID: 0002_trends
Revises: 0001
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_trends"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Plain SQL that SQLite (≥ 3.25, window functions) and PostgreSQL both accept. Documented in docs/trends.md.
VIEWS = {
    # Every tracked part in the fleet, worst first: rank 1 = lowest health (then soonest forecast failure).
    "v_worst_parts": """
        SELECT RANK() OVER (ORDER BY h.health, h.ttf_h) AS fleet_rank,
               h.tractor_id, h.part_id, p.name AS part_name, h.signal, h.status, h.health, h.level,
               p.warning_threshold, p.failure_threshold, h.slope_per_h, h.ttf_h, h.ttf_lo_h, h.ttf_hi_h,
               p.lead_time_h, h.episode_id, h.as_of
        FROM part_health h JOIN parts p ON p.part_id = h.part_id""",
    # Closed windows with the thresholds of the part each signal watches; filter by tractor (and signal).
    "v_tractor_trends": """
        SELECT w.tractor_id, w.signal, p.part_id, w.window_start, w.window_end, w.count, w.mean, w.min, w.max,
               w.std, w.n_used, w.norm_value, w.level, w.slope_per_h, w.slope_lo, w.slope_hi, w.quality_flags,
               p.warning_threshold, p.failure_threshold
        FROM trend_windows w LEFT JOIN parts p ON p.signal = w.signal""",
}


def upgrade() -> None:
    op.add_column("trend_windows", sa.Column("n_used", sa.Integer(), nullable=True))
    op.add_column("trend_windows", sa.Column("level", sa.Float(), nullable=True))
    op.add_column("part_health", sa.Column("ttf_hi_h", sa.Float(), nullable=True))
    op.add_column("part_health", sa.Column("episode_id", sa.String(length=128), nullable=True))
    op.create_index("ix_trend_windows_start", "trend_windows", ["window_start"])
    op.create_index("ix_part_health_status_health", "part_health", ["status", "health"])
    if op.get_bind().dialect.name == "postgresql":
        # Rows arrive roughly in event-time order, so a BRIN index answers "last N days across the fleet"
        # at a few pages per 100 million rows.
        op.execute("CREATE INDEX ix_trend_windows_end_brin ON trend_windows USING brin (window_end)")
    for name, sql in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {sql}")


def downgrade() -> None:
    for name in reversed(list(VIEWS)):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_trend_windows_end_brin")
    op.drop_index("ix_part_health_status_health", table_name="part_health")
    op.drop_index("ix_trend_windows_start", table_name="trend_windows")
    with op.batch_alter_table("part_health") as batch:
        batch.drop_column("episode_id")
        batch.drop_column("ttf_hi_h")
    with op.batch_alter_table("trend_windows") as batch:
        batch.drop_column("level")
        batch.drop_column("n_used")

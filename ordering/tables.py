"""Ordering tables: tractors, parts catalog, orders and their audit trail, replacements, tokens, webhooks."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData()

tractors = Table(
    "tractors", metadata,
    Column("tractor_id", String(32), primary_key=True),
    Column("model", String(64), nullable=True),
    Column("first_seen", DateTime(timezone=True), nullable=False),
)

parts = Table(
    "parts", metadata,
    Column("part_id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("signal", String(64), nullable=False),
    Column("direction", String(8), nullable=False),  # "falling" | "rising"
    Column("nominal", Float, nullable=False),
    Column("warning_threshold", Float, nullable=False),
    Column("failure_threshold", Float, nullable=False),
    Column("lead_time_h", Float, nullable=False),
    Column("price_eur", Float, nullable=False),
    Column("extra", JSON, nullable=True),
)

orders = Table(
    "orders", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("tractor_id", String(32), nullable=False),
    Column("part_id", String(64), ForeignKey("parts.part_id"), nullable=False),
    Column("episode_id", String(128), nullable=False),
    Column("status", String(16), nullable=False),
    Column("priority", String(8), nullable=False),
    Column("placed_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("alert_count", Integer, nullable=False),
    Column("last_alert_at", DateTime(timezone=True), nullable=False),
    Column("ttf_h", Float, nullable=True),
    Column("expected_delivery", DateTime(timezone=True), nullable=True),
    Column("cost_eur", Float, nullable=False),
    Column("evidence", JSON, nullable=False),
    Column("cancel_reason", Text, nullable=True),
    # Added by revision 0002_ordering: lifecycle timestamps and denormalised filter columns.
    Column("signal", String(64), nullable=True),
    Column("lead_time_h", Float, nullable=True),
    Column("cancel_code", String(32), nullable=True),
    Column("acknowledged_at", DateTime(timezone=True), nullable=True),
    Column("shipped_at", DateTime(timezone=True), nullable=True),
    Column("installed_at", DateTime(timezone=True), nullable=True),
    Column("cancelled_at", DateTime(timezone=True), nullable=True),
    Index("ix_orders_status", "status"),
    Index("ix_orders_placed_at", "placed_at"),
    Index("ix_orders_priority", "priority", "placed_at"),
    Index("ix_orders_tractor_part", "tractor_id", "part_id"),
    # At most one open order per (tractor, part), enforced by the database itself.
    Index("uq_orders_open", "tractor_id", "part_id", unique=True,
          sqlite_where=text("status IN ('placed','acknowledged','shipped')"),
          postgresql_where=text("status IN ('placed','acknowledged','shipped')")),
)

order_events = Table(
    "order_events", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("order_id", BigInteger, ForeignKey("orders.id"), nullable=False, index=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("kind", String(32), nullable=False),  # placed, alert_repeated, acknowledged, ...
    Column("actor", String(64), nullable=False),
    Column("from_status", String(16), nullable=True),
    Column("to_status", String(16), nullable=True),
    Column("detail", JSON, nullable=True),
)

order_alerts = Table(
    "order_alerts", metadata,
    Column("alert_id", String(128), primary_key=True),
    Column("order_id", BigInteger, ForeignKey("orders.id"), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
)

# Installed parts; the trend handler reads this table (plain SQL) to reset that part's baseline.
part_replacements = Table(
    "part_replacements", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("tractor_id", String(32), nullable=False),
    Column("part_id", String(64), nullable=False),
    Column("order_id", BigInteger, ForeignKey("orders.id"), nullable=True),
    Column("installed_at", DateTime(timezone=True), nullable=False),
    Index("ix_part_replacements_tractor_part", "tractor_id", "part_id", "installed_at"),
)

# API tokens: only a SHA-256 of the secret is stored; the secret is shown once at creation.
api_tokens = Table(
    "api_tokens", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("name", String(100), nullable=False),
    Column("role", String(16), nullable=False),  # operator | analyst | admin
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

# One webhook delivery per new order, written with the order (an outbox for HTTP), sent with retries.
order_webhooks = Table(
    "order_webhooks", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("order_id", BigInteger, ForeignKey("orders.id"), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("status", String(16), nullable=False),  # pending | delivered | failed | skipped
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("delivered_at", DateTime(timezone=True), nullable=True),
    Index("ix_order_webhooks_due", "status", "next_attempt_at"),
)

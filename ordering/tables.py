"""Ordering tables: tractors, the parts catalog, orders with their audit trail, processed alerts."""

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
    Index("ix_orders_status", "status"),
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

"""Runtime tables: consumed offsets, the transactional outbox and invocation logs."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
)
from sqlalchemy.orm import Session

metadata = MetaData()

fn_offsets = Table(
    "fn_offsets", metadata,
    Column("consumer_group", String(128), primary_key=True),
    Column("topic", String(255), primary_key=True),
    Column("partition", Integer, primary_key=True, autoincrement=False),
    Column("next_offset", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

outbox = Table(
    "outbox", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("source", String(128), nullable=False, index=True),
    Column("topic", String(255), nullable=False),
    Column("key", LargeBinary, nullable=True),
    Column("value", LargeBinary, nullable=False),
    Column("headers", JSON, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

fn_invocations = Table(
    "fn_invocations", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("function", String(128), nullable=False, index=True),
    Column("request_id", String(64), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("duration_ms", Float, nullable=False),
    Column("batch_size", Integer, nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("detail", Text, nullable=True),
)


def load_offsets(session: Session, group: str, topic: str) -> dict[int, int]:
    """Next offset to read per partition, as stored by the last committed batch."""
    rows = session.execute(
        select(fn_offsets.c.partition, fn_offsets.c.next_offset)
        .where(fn_offsets.c.consumer_group == group, fn_offsets.c.topic == topic)
    )
    return {int(p): int(o) for p, o in rows}


def save_offsets(session: Session, group: str, offsets: dict[tuple[str, int], int]) -> None:
    """Store next offsets inside the caller's transaction (upsert, portable across SQLite/PostgreSQL)."""
    now = datetime.now(UTC)
    for (topic, partition), next_offset in offsets.items():
        where = ((fn_offsets.c.consumer_group == group) & (fn_offsets.c.topic == topic)
                 & (fn_offsets.c.partition == partition))
        updated = session.execute(fn_offsets.update().where(where).values(next_offset=next_offset, updated_at=now))
        if updated.rowcount == 0:  # type: ignore[attr-defined]
            session.execute(insert(fn_offsets).values(consumer_group=group, topic=topic, partition=partition,
                                                      next_offset=next_offset, updated_at=now))


def enqueue(session: Session, source: str, topic: str, key: bytes | None, value: dict[str, Any] | bytes,
            headers: dict[str, str] | None = None) -> None:
    """Add a message to the outbox in the caller's transaction; a relay publishes it after commit."""
    body = value if isinstance(value, bytes) else json.dumps(value, separators=(",", ":"), default=str).encode()
    session.execute(insert(outbox).values(source=source, topic=topic, key=key, value=body, headers=headers,
                                          created_at=datetime.now(UTC)))


def pending(session: Session, source: str, limit: int = 1000) -> list[Any]:
    """Oldest unpublished outbox rows of one source."""
    return list(session.execute(select(outbox).where(outbox.c.source == source).order_by(outbox.c.id).limit(limit)))


def remove(session: Session, ids: Iterable[int]) -> None:
    """Delete published outbox rows."""
    ids = list(ids)
    if ids:
        session.execute(delete(outbox).where(outbox.c.id.in_(ids)))

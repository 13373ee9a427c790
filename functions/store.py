"""Runtime tables: consumed offsets, the transactional outbox, invocation logs and tumbling-window state."""

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
from sqlalchemy.exc import IntegrityError
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
    # Added by revision 0002_functions: observability of each invocation.
    Column("worker", String(64), nullable=True),
    Column("records_failed", Integer, nullable=True),
    Column("records_filtered", Integer, nullable=True),
    Column("iterator_age_ms", BigInteger, nullable=True),
    Column("log", Text, nullable=True),
)

fn_window_state = Table(
    "fn_window_state", metadata,
    Column("consumer_group", String(128), primary_key=True),
    Column("topic", String(255), primary_key=True),
    Column("partition", Integer, primary_key=True, autoincrement=False),
    Column("window_start_ms", BigInteger, nullable=False),
    Column("state", JSON, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


class Fenced(RuntimeError):
    """Another consumer-group member moved a partition's stored offset: this member no longer owns it."""


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


def advance_offsets(session: Session, group: str, offsets: dict[tuple[str, int], int],
                    expected: dict[tuple[str, int], int | None]) -> None:
    """Move stored offsets from ``expected`` to ``offsets`` in the caller's transaction, or raise Fenced.

    The compare-and-set makes a member that lost a partition in a rebalance unable to commit a batch that
    the new owner is processing too: exactly one of them commits its effects.
    """
    now = datetime.now(UTC)
    for (topic, partition), next_offset in offsets.items():
        before = expected.get((topic, partition))
        where = ((fn_offsets.c.consumer_group == group) & (fn_offsets.c.topic == topic)
                 & (fn_offsets.c.partition == partition))
        if before is None:
            if session.execute(select(fn_offsets.c.next_offset).where(where)).first() is not None:
                raise Fenced(f"{topic}[{partition}] was committed by another member")
            try:  # a concurrent insert by another member fails on the primary key; the caller rolls back
                session.execute(insert(fn_offsets).values(consumer_group=group, topic=topic, partition=partition,
                                                          next_offset=next_offset, updated_at=now))
            except IntegrityError as exc:
                raise Fenced(f"{topic}[{partition}] was committed by another member") from exc
            continue
        updated = session.execute(fn_offsets.update().where(where & (fn_offsets.c.next_offset == before))
                                  .values(next_offset=next_offset, updated_at=now))
        if updated.rowcount != 1:  # type: ignore[attr-defined]
            raise Fenced(f"{topic}[{partition}] moved away from offset {before}")


def load_window_states(session: Session, group: str, topic: str) -> dict[int, tuple[int, Any]]:
    """Open tumbling window per partition: (window start in ms, state)."""
    rows = session.execute(
        select(fn_window_state.c.partition, fn_window_state.c.window_start_ms, fn_window_state.c.state)
        .where(fn_window_state.c.consumer_group == group, fn_window_state.c.topic == topic))
    return {int(p): (int(start), state) for p, start, state in rows}


def save_window_state(session: Session, group: str, topic: str, partition: int,
                      window: tuple[int, Any] | None) -> None:
    """Store (or with None, delete) a partition's open window in the caller's transaction."""
    where = ((fn_window_state.c.consumer_group == group) & (fn_window_state.c.topic == topic)
             & (fn_window_state.c.partition == partition))
    session.execute(delete(fn_window_state).where(where))
    if window is not None:
        session.execute(insert(fn_window_state).values(
            consumer_group=group, topic=topic, partition=partition, window_start_ms=window[0],
            state=window[1], updated_at=datetime.now(UTC)))


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

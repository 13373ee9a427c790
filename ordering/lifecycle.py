"""Order lifecycle: placed → acknowledged → shipped → installed, or cancelled, with audit and outbox."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from functions import store
from ordering.tables import order_events, orders, part_replacements

ORDERS_TOPIC = "orders"
STATUSES = ("placed", "acknowledged", "shipped", "installed", "cancelled")
OPEN_STATUSES = ("placed", "acknowledged", "shipped")
# Which statuses each status may move to; installed and cancelled are final.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "placed": ("acknowledged", "cancelled"),
    "acknowledged": ("shipped", "cancelled"),
    "shipped": ("installed", "cancelled"),
    "installed": (),
    "cancelled": (),
}
CANCEL_CODES = ("false_alarm", "duplicate", "not_needed", "other")
TIMESTAMP_COLUMN = {"acknowledged": "acknowledged_at", "shipped": "shipped_at", "installed": "installed_at",
                    "cancelled": "cancelled_at"}

Emit = Callable[[str, "str | bytes | None", dict[str, Any]], None]


class OrderNotFound(LookupError):
    """The order does not exist."""


class IllegalTransition(ValueError):
    """The order's current status does not allow the requested one (HTTP 409)."""


class InvalidTransition(ValueError):
    """The request itself is incomplete or malformed, e.g. a cancellation without a reason (HTTP 422)."""


def order_document(row: Any) -> dict[str, Any]:
    """The public JSON shape of an order or event row (API and the ``orders`` topic)."""
    doc = dict(row._mapping)
    for k, v in doc.items():
        if isinstance(v, datetime):
            doc[k] = (v if v.tzinfo else v.replace(tzinfo=UTC)).isoformat()
    return doc


def outbox_emitter(session: Session, source: str, topic_prefix: str = "") -> Emit:
    """An ``emit`` that writes to the transactional outbox of ``source`` in ``session``'s transaction."""
    def emit(topic: str, key: str | bytes | None, value: dict[str, Any]) -> None:
        k = key.encode() if isinstance(key, str) else key
        store.enqueue(session, source, f"{topic_prefix}{topic}", k, value)
    return emit


def record_event(session: Session, emit: Emit, order_id: int, kind: str, actor: str, from_status: str | None,
                 to_status: str | None, detail: dict[str, Any] | None, now: datetime) -> int:
    """Append to the order's audit trail and queue its new state on ``orders`` (same transaction)."""
    result = session.execute(insert(order_events).values(order_id=order_id, at=now, kind=kind, actor=actor,
                                                         from_status=from_status, to_status=to_status,
                                                         detail=detail))
    event_id = int(result.inserted_primary_key[0])
    row = session.execute(select(orders).where(orders.c.id == order_id)).one()
    # event_id is unique per change: consumers of the at-least-once relay use it to drop duplicates.
    emit(ORDERS_TOPIC, row.tractor_id, {"event": kind, "event_id": event_id, "at": now.isoformat(), "actor": actor,
                                        "detail": detail, "order": order_document(row)})
    return event_id


def allowed_next(status: str) -> tuple[str, ...]:
    """Statuses an order in ``status`` may move to."""
    return TRANSITIONS.get(status, ())


def transition(session: Session, emit: Emit, order_id: int, to: str, actor: str, reason: str | None = None,
               cancel_code: str | None = None, note: str | None = None, now: datetime | None = None) -> dict[str, Any]:
    """Move an order to ``to``; installing records a part replacement. Returns the updated order."""
    now = now or datetime.now(UTC)
    if to not in STATUSES:
        raise InvalidTransition(f"unknown status {to!r}; use one of {', '.join(STATUSES)}")
    row = session.execute(select(orders).where(orders.c.id == order_id)).first()
    if row is None:
        raise OrderNotFound(f"order {order_id} not found")
    current = row.status
    if to not in allowed_next(current):
        nxt = ", ".join(allowed_next(current)) or "nothing (it is closed)"
        raise IllegalTransition(f"order {order_id} is {current}; it cannot become {to} (from {current} it can "
                                f"become {nxt})")
    values: dict[str, Any] = {"status": to, "updated_at": now, TIMESTAMP_COLUMN[to]: now}
    detail: dict[str, Any] = {}
    if note:
        detail["note"] = note
    if to == "cancelled":
        if not reason or not reason.strip():
            raise InvalidTransition("cancelling an order needs a reason (e.g. why it is a false alarm)")
        code = cancel_code or "other"
        if code not in CANCEL_CODES:
            raise InvalidTransition(f"cancel_code must be one of {', '.join(CANCEL_CODES)}")
        values.update(cancel_reason=reason.strip(), cancel_code=code)
        detail.update(reason=reason.strip(), cancel_code=code)
    # Compare-and-set on the status: two operators acting at once cannot both win.
    changed = session.execute(update(orders).where((orders.c.id == order_id) & (orders.c.status == current))
                              .values(**values))
    if changed.rowcount != 1:  # type: ignore[attr-defined]
        raise IllegalTransition(f"order {order_id} changed while you were acting on it; reload and retry")
    if to == "installed":
        session.execute(insert(part_replacements).values(tractor_id=row.tractor_id, part_id=row.part_id,
                                                         order_id=order_id, installed_at=now))
    record_event(session, emit, order_id, to, actor, current, to, detail or None, now)
    return order_document(session.execute(select(orders).where(orders.c.id == order_id)).one())

"""The order-placing function: wear alerts become at most one open order per (tractor, part)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from functions.model import Context
from ordering.lifecycle import OPEN_STATUSES, ORDERS_TOPIC, Emit, order_document, record_event
from ordering.tables import order_alerts, order_webhooks, orders, parts, tractors

__all__ = ["ORDERS_TOPIC", "OPEN_STATUSES", "handler", "order_document", "place", "priority"]

EVIDENCE_KEYS = ("signal", "level", "slope_per_h", "slope_ci_per_h", "ttf_h", "ttf_earliest_h", "failure_threshold",
                 "lead_time_h", "detected_at", "window_ids", "episode_id")


def priority(ttf_h: float | None, lead_time_h: float) -> str:
    """P1 when the part may fail before a replacement arrives, P2 within a week of that, else P3."""
    if ttf_h is None:
        return "P3"
    if ttf_h <= lead_time_h:
        return "P1"
    if ttf_h <= lead_time_h + 168:
        return "P2"
    return "P3"


def _ensure_tractor(session: Session, tractor_id: str, now: datetime) -> None:
    if session.execute(select(tractors.c.tractor_id).where(tractors.c.tractor_id == tractor_id)).first() is None:
        session.execute(insert(tractors).values(tractor_id=tractor_id, first_seen=now))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def place(session: Session, alert: dict[str, Any], emit: Emit, now: datetime | None = None) -> int | None:
    """Apply one wear alert; returns the order id (None when the alert was already applied)."""
    now = now or datetime.now(UTC)
    for key in ("alert_id", "tractor_id", "part_id"):
        if not isinstance(alert.get(key), str) or not alert[key]:
            raise ValueError(f"wear alert misses {key!r}: {str(alert)[:200]}")
    alert_id = alert["alert_id"]
    if session.execute(select(order_alerts.c.alert_id).where(order_alerts.c.alert_id == alert_id)).first():
        return None
    part = session.execute(select(parts).where(parts.c.part_id == alert["part_id"])).first()
    if part is None:
        raise ValueError(f"alert {alert_id} names unknown part {alert['part_id']!r}")
    tractor_id = alert["tractor_id"]
    _ensure_tractor(session, tractor_id, now)
    ttf = _number(alert.get("ttf_h"))
    episode_id = str(alert.get("episode_id") or alert_id)
    evidence = {k: alert.get(k) for k in EVIDENCE_KEYS}
    key = (orders.c.tractor_id == tractor_id) & (orders.c.part_id == part.part_id)
    current = session.execute(select(orders).where(key & orders.c.status.in_(OPEN_STATUSES))).first()
    if current is None:
        # An operator cancelled this very episode (e.g. as a false alarm): keep the alert with that order
        # instead of re-ordering; a new episode (after a reset or a quiet spell) orders again.
        current = session.execute(select(orders).where(key & (orders.c.status == "cancelled")
                                                       & (orders.c.episode_id == episode_id))
                                  .order_by(orders.c.id.desc())).first()
    if current is None:
        evidence["first_detected_at"] = alert.get("detected_at")
        result = session.execute(insert(orders).values(
            tractor_id=tractor_id, part_id=part.part_id, episode_id=episode_id, status="placed",
            priority=priority(ttf, part.lead_time_h), placed_at=now, updated_at=now, alert_count=1,
            last_alert_at=now, ttf_h=ttf, expected_delivery=now + timedelta(hours=part.lead_time_h),
            cost_eur=part.price_eur, evidence=evidence, signal=part.signal, lead_time_h=part.lead_time_h))
        order_id = int(result.inserted_primary_key[0])
        record_event(session, emit, order_id, "placed", "ordering.place", None, "placed",
                     {"alert_id": alert_id}, now)
        doc = order_document(session.execute(select(orders).where(orders.c.id == order_id)).one())
        session.execute(insert(order_webhooks).values(order_id=order_id, payload={"event": "placed", "order": doc},
                                                      status="pending", attempts=0, next_attempt_at=now,
                                                      created_at=now))
    else:
        order_id = int(current.id)
        evidence["first_detected_at"] = (current.evidence or {}).get("first_detected_at")
        values: dict[str, Any] = {"alert_count": current.alert_count + 1, "last_alert_at": now, "updated_at": now}
        if current.status != "cancelled":
            values.update(ttf_h=ttf, priority=priority(ttf, part.lead_time_h), evidence=evidence)
        session.execute(update(orders).where(orders.c.id == order_id).values(**values))
        record_event(session, emit, order_id, "alert_repeated", "ordering.place", current.status, current.status,
                     {"alert_id": alert_id, "ttf_h": ttf}, now)
    session.execute(insert(order_alerts).values(alert_id=alert_id, order_id=order_id, received_at=now))
    return order_id


def handler(event: dict[str, Any], context: Context) -> None:
    """Place or update orders for every wear alert in the batch."""
    session = context.session
    assert session is not None, "ordering.place needs a transactional function"
    for recs in event["records"].values():
        for r in recs:
            alert = r.get("json")
            if not isinstance(alert, dict):
                raise ValueError(f"offset {r['offset']}: wear alert is not a JSON object")
            if place(session, alert, context.emit) is not None:
                context.metrics.incr("orders_touched")

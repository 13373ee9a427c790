"""The order-placing function: wear alerts become at most one open order per (tractor, part)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from functions.model import Context
from ordering.tables import order_alerts, order_events, orders, parts, tractors

ORDERS_TOPIC = "orders"
OPEN_STATUSES = ("placed", "acknowledged", "shipped")


def priority(ttf_h: float | None, lead_time_h: float) -> str:
    """P1 when the part may fail before a replacement arrives, P2 within a week of that, else P3."""
    if ttf_h is None:
        return "P3"
    if ttf_h <= lead_time_h:
        return "P1"
    if ttf_h <= lead_time_h + 168:
        return "P2"
    return "P3"


def order_document(row: Any) -> dict[str, Any]:
    """The public JSON shape of an order (API and the ``orders`` topic)."""
    doc = dict(row._mapping)
    for k, v in doc.items():
        if isinstance(v, datetime):
            doc[k] = v.isoformat()
    return doc


def publish_change(session: Session, emit: Any, order_id: int, kind: str) -> None:
    """Queue the order's new state on the ``orders`` topic via the outbox (same transaction)."""
    row = session.execute(select(orders).where(orders.c.id == order_id)).one()
    emit(ORDERS_TOPIC, row.tractor_id, {"event": kind, "order": order_document(row)})


def _ensure_tractor(session: Session, tractor_id: str, now: datetime) -> None:
    if session.execute(select(tractors.c.tractor_id).where(tractors.c.tractor_id == tractor_id)).first() is None:
        session.execute(insert(tractors).values(tractor_id=tractor_id, first_seen=now))


def place(session: Session, alert: dict[str, Any], emit: Any, now: datetime | None = None) -> int | None:
    """Apply one wear alert; returns the order id (None when the alert was already applied)."""
    now = now or datetime.now(UTC)
    alert_id = str(alert["alert_id"])
    if session.execute(select(order_alerts.c.alert_id).where(order_alerts.c.alert_id == alert_id)).first():
        return None
    part = session.execute(select(parts).where(parts.c.part_id == alert["part_id"])).first()
    if part is None:
        raise ValueError(f"alert {alert_id} names unknown part {alert['part_id']!r}")
    tractor_id = str(alert["tractor_id"])
    _ensure_tractor(session, tractor_id, now)
    ttf = alert.get("ttf_h")
    evidence = {k: alert.get(k) for k in ("signal", "level", "slope_per_h", "slope_ci_per_h", "ttf_h",
                                          "ttf_earliest_h", "failure_threshold", "lead_time_h", "detected_at",
                                          "window_ids", "episode_id")}
    open_order = session.execute(select(orders).where(
        (orders.c.tractor_id == tractor_id) & (orders.c.part_id == part.part_id)
        & orders.c.status.in_(OPEN_STATUSES))).first()
    if open_order is None:
        evidence["first_detected_at"] = alert.get("detected_at")
        result = session.execute(insert(orders).values(
            tractor_id=tractor_id, part_id=part.part_id, episode_id=str(alert.get("episode_id", alert_id)),
            status="placed", priority=priority(ttf, part.lead_time_h), placed_at=now, updated_at=now,
            alert_count=1, last_alert_at=now, ttf_h=ttf, expected_delivery=now + timedelta(hours=part.lead_time_h),
            cost_eur=part.price_eur, evidence=evidence))
        order_id = int(result.inserted_primary_key[0])
        kind = "placed"
        session.execute(insert(order_events).values(order_id=order_id, at=now, kind=kind, actor="ordering.place",
                                                    from_status=None, to_status="placed",
                                                    detail={"alert_id": alert_id}))
    else:
        order_id = int(open_order.id)
        kind = "alert_repeated"
        evidence["first_detected_at"] = (open_order.evidence or {}).get("first_detected_at")
        session.execute(update(orders).where(orders.c.id == order_id).values(
            alert_count=open_order.alert_count + 1, last_alert_at=now, updated_at=now, ttf_h=ttf,
            priority=priority(ttf, part.lead_time_h), evidence=evidence))
        session.execute(insert(order_events).values(order_id=order_id, at=now, kind=kind, actor="ordering.place",
                                                    from_status=open_order.status, to_status=open_order.status,
                                                    detail={"alert_id": alert_id, "ttf_h": ttf}))
    session.execute(insert(order_alerts).values(alert_id=alert_id, order_id=order_id, received_at=now))
    publish_change(session, emit, order_id, kind)
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

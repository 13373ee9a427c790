"""Order placement and lifecycle on a real SQLite database: one open order per part, audit, replacements."""

from __future__ import annotations

import json

import pytest
from ordering_fixtures import T0, alert
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from functions import store
from ordering.lifecycle import IllegalTransition, InvalidTransition, OrderNotFound, outbox_emitter, transition
from ordering.place import place, priority
from ordering.tables import order_events, order_webhooks, orders, part_replacements

Db = tuple[str, sessionmaker[Session]]


def count(session: Session, table: object) -> int:
    return int(session.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]


def test_priority_follows_time_to_failure_against_lead_time() -> None:
    assert priority(100, 120) == "P1" and priority(200, 120) == "P2" and priority(500, 120) == "P3"
    assert priority(None, 120) == "P3"


def test_repeated_alert_updates_the_open_order_and_duplicates_are_ignored(seeded_db: Db) -> None:
    _, sessions = seeded_db
    with sessions() as s:
        emit = outbox_emitter(s, "ordering-place")
        again = alert("T00001", "OIL-PUMP", "oil_pressure_kpa", n=2, ttf_h=20.0, level=180.0)
        assert place(s, again, emit) == 1
        assert place(s, again, emit) is None  # same alert_id redelivered by Kafka
        s.commit()
        o = s.execute(select(orders).where(orders.c.id == 1)).one()
        assert (o.alert_count, o.ttf_h, o.evidence["level"], o.status) == (2, 20.0, 180.0, "placed")
        assert count(s, orders) == 3
        kinds = [e.kind for e in s.execute(select(order_events).where(order_events.c.order_id == 1))]
        assert kinds == ["placed", "alert_repeated"]
        messages = [json.loads(r.value) for r in store.pending(s, "ordering-place")]
        assert [m["event"] for m in messages][-1] == "alert_repeated" and messages[-1]["order"]["alert_count"] == 2


def test_new_order_queues_one_webhook_delivery(seeded_db: Db) -> None:
    _, sessions = seeded_db
    with sessions() as s:
        hooks = s.execute(select(order_webhooks).order_by(order_webhooks.c.id)).all()
        assert [(h.order_id, h.status) for h in hooks] == [(1, "pending"), (2, "pending"), (3, "pending")]
        assert hooks[0].payload["order"]["tractor_id"] == "T00001"


def test_lifecycle_to_installed_records_replacement_then_a_new_episode_orders_again(seeded_db: Db) -> None:
    _, sessions = seeded_db
    with sessions() as s:
        emit = outbox_emitter(s, "ordering-api")
        for to in ("acknowledged", "shipped", "installed"):
            transition(s, emit, 1, to, "test")
        s.commit()
        repl = s.execute(select(part_replacements)).one()
        assert (repl.tractor_id, repl.part_id, repl.order_id) == ("T00001", "OIL-PUMP", 1)
        # a new wear episode after the replacement opens a new order
        new = place(s, alert("T00001", "OIL-PUMP", "oil_pressure_kpa", episode="T00001:OIL-PUMP:2"),
                    outbox_emitter(s, "ordering-place"))
        s.commit()
        assert new is not None and new != 1


def test_alert_of_a_cancelled_episode_does_not_reorder(seeded_db: Db) -> None:
    _, sessions = seeded_db
    with sessions() as s:
        transition(s, outbox_emitter(s, "ordering-api"), 1, "cancelled", "test", reason="loose sensor",
                   cancel_code="false_alarm")
        oid = place(s, alert("T00001", "OIL-PUMP", "oil_pressure_kpa", n=2), outbox_emitter(s, "ordering-place"))
        s.commit()
        assert oid == 1 and count(s, orders) == 3
        o = s.execute(select(orders).where(orders.c.id == 1)).one()
        assert (o.status, o.alert_count, o.cancel_code, o.cancel_reason) == ("cancelled", 2, "false_alarm",
                                                                             "loose sensor")


def test_transition_errors_are_specific(seeded_db: Db) -> None:
    _, sessions = seeded_db
    with sessions() as s:
        emit = outbox_emitter(s, "ordering-api")
        with pytest.raises(IllegalTransition, match="placed; it cannot become shipped"):
            transition(s, emit, 1, "shipped", "test")
        with pytest.raises(InvalidTransition, match="reason"):
            transition(s, emit, 1, "cancelled", "test", reason="  ")
        with pytest.raises(InvalidTransition, match="cancel_code"):
            transition(s, emit, 1, "cancelled", "test", reason="x", cancel_code="bored")
        with pytest.raises(OrderNotFound):
            transition(s, emit, 99, "acknowledged", "test")
        assert store.pending(s, "ordering-api") == []


def test_bad_alerts_are_refused_without_side_effects(seeded_db: Db) -> None:
    _, sessions = seeded_db
    with sessions() as s:
        emit = outbox_emitter(s, "ordering-place")
        with pytest.raises(ValueError, match="unknown part"):
            place(s, {**alert("T00009", "NOPE", "x"), "part_id": "NOPE"}, emit)
        with pytest.raises(ValueError, match="tractor_id"):
            place(s, {"alert_id": "a", "part_id": "OIL-PUMP"}, emit, now=T0)
        s.rollback()
        assert count(s, orders) == 3

"""Webhook deliveries against a real local HTTP server, and the relay surviving an unreachable Kafka."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from functions import store
from ordering.dispatch import Dispatcher, WebhookConfig, deliver_webhooks, kafka_producer_factory
from ordering.lifecycle import outbox_emitter, transition
from ordering.tables import order_webhooks

Db = tuple[str, sessionmaker[Session]]


class Receiver(BaseHTTPRequestHandler):
    """Answers 500 to the first ``fail_first`` POSTs, then 200; remembers the bodies."""

    fail_first = 0
    bodies: list[dict[str, object]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append({"body": body, "event": self.headers["X-Fleetwatch-Event"]})
        failing = len(type(self).bodies) <= type(self).fail_first
        self.send_response(500 if failing else 200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def receiver() -> Iterator[tuple[str, type[Receiver]]]:
    handler = type("R", (Receiver,), {"fail_first": 2, "bodies": []})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", handler
    server.shutdown()


def statuses(sessions: sessionmaker[Session]) -> list[tuple[int, str, int]]:
    with sessions() as s:
        return [(r.order_id, r.status, r.attempts) for r in s.execute(select(order_webhooks).order_by(
            order_webhooks.c.id))]


def test_webhook_is_retried_with_backoff_until_delivered(seeded_db: Db, receiver: tuple[str, type[Receiver]]
                                                         ) -> None:
    _, sessions = seeded_db
    url, handler = receiver
    cfg = WebhookConfig(url=url, max_attempts=5, timeout_s=5, backoff_s=60)
    now = datetime.now(UTC)
    deliver_webhooks(sessions, cfg, now=now)  # orders 1 and 2 fail (500), order 3 is delivered
    assert statuses(sessions) == [(1, "pending", 1), (2, "pending", 1), (3, "delivered", 1)]
    deliver_webhooks(sessions, cfg, now=now + timedelta(seconds=30))  # not due yet: backoff
    assert statuses(sessions)[0] == (1, "pending", 1)
    deliver_webhooks(sessions, cfg, now=now + timedelta(seconds=61))
    assert statuses(sessions) == [(1, "delivered", 2), (2, "delivered", 2), (3, "delivered", 1)]
    assert {b["body"]["order"]["id"] for b in handler.bodies} == {1, 2, 3}  # type: ignore[index]
    assert all(b["event"] == "order.placed" for b in handler.bodies)


def test_webhook_gives_up_after_max_attempts(seeded_db: Db) -> None:
    _, sessions = seeded_db
    cfg = WebhookConfig(url="http://127.0.0.1:9/closed", max_attempts=2, timeout_s=1, backoff_s=0)
    deliver_webhooks(sessions, cfg)
    deliver_webhooks(sessions, cfg, now=datetime.now(UTC) + timedelta(seconds=1))
    assert {st for _, st, _ in statuses(sessions)} == {"failed"}
    with sessions() as s:
        assert "Error" in s.execute(select(order_webhooks.c.last_error)).scalars().first()


def test_without_a_webhook_url_deliveries_are_marked_skipped(seeded_db: Db) -> None:
    _, sessions = seeded_db
    deliver_webhooks(sessions, WebhookConfig(url=None))
    assert {st for _, st, _ in statuses(sessions)} == {"skipped"}


def test_dispatcher_keeps_changes_in_the_outbox_while_kafka_is_unreachable(seeded_db: Db) -> None:
    _, sessions = seeded_db
    with sessions() as s:
        transition(s, outbox_emitter(s, "ordering-api"), 1, "acknowledged", "test")
        s.commit()
    dispatcher = Dispatcher(sessions, kafka_producer_factory("127.0.0.1:9", bootstrap_timeout_ms=500),
                            WebhookConfig(url=None))
    dispatcher.run_once()  # must not raise
    with sessions() as s:
        assert [json.loads(r.value)["event"] for r in store.pending(s, "ordering-api")] == ["acknowledged"]
    assert {st for _, st, _ in statuses(sessions)} == {"skipped"}

"""Background delivery for the API process: relays its order outbox to Kafka and sends order webhooks."""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from functions import store
from ordering.tables import order_webhooks

log = logging.getLogger("fleetwatch.ordering.dispatch")
API_SOURCE = "ordering-api"  # outbox source of changes made through the REST API


class Producer(Protocol):
    """The part of ``kafka.KafkaProducer`` the relay uses."""

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None,
             headers: list[tuple[str, bytes]] | None = None) -> Any:
        """Queue a record; returns a future whose ``get`` waits for the broker's acknowledgement."""

    def close(self, timeout: float | None = None) -> None:
        """Flush and release the client."""


@dataclass
class WebhookConfig:
    """Where and how to POST new orders (no URL: deliveries are marked skipped)."""

    url: str | None = None
    max_attempts: int = 5
    timeout_s: float = 5.0
    backoff_s: float = 2.0


def relay_outbox(sessions: sessionmaker[Session], producer: Producer, source: str = API_SOURCE,
                 batch: int = 500) -> int:
    """Publish pending outbox rows of ``source`` and delete them after Kafka acknowledged; returns the count."""
    sent = 0
    while True:
        with sessions() as session:
            # SKIP LOCKED lets several API processes relay side by side on PostgreSQL (ignored by SQLite).
            rows = list(session.execute(select(store.outbox).where(store.outbox.c.source == source)
                                        .order_by(store.outbox.c.id).limit(batch)
                                        .with_for_update(skip_locked=True)))
            if not rows:
                return sent
            futures = [producer.send(r.topic, key=r.key, value=r.value,
                                     headers=[(k, v.encode()) for k, v in (r.headers or {}).items()]) for r in rows]
            for f in futures:
                f.get(timeout=30)
            store.remove(session, [r.id for r in rows])
            session.commit()
            sent += len(rows)


def post_json(url: str, body: dict[str, Any], headers: dict[str, str], timeout: float) -> None:
    """POST ``body`` as JSON; raises on a network error or a non-2xx answer."""
    data = json.dumps(body, default=str).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (URL comes from settings)
        if not 200 <= resp.status < 300:
            raise urllib.error.HTTPError(url, resp.status, "not a 2xx answer", resp.headers, None)


def deliver_webhooks(sessions: sessionmaker[Session], cfg: WebhookConfig,
                     post: Callable[[str, dict[str, Any], dict[str, str], float], None] = post_json,
                     now: datetime | None = None, batch: int = 50) -> int:
    """Send due webhook deliveries once each, rescheduling failures with exponential backoff."""
    now = now or datetime.now(UTC)
    done = 0
    with sessions() as session:
        due = list(session.execute(select(order_webhooks).where(
            (order_webhooks.c.status == "pending") & (order_webhooks.c.next_attempt_at <= now))
            .order_by(order_webhooks.c.id).limit(batch).with_for_update(skip_locked=True)))
        for row in due:
            values: dict[str, Any]
            if not cfg.url:
                values = {"status": "skipped", "last_error": "no webhook URL configured"}
            else:
                attempts = row.attempts + 1
                try:
                    post(cfg.url, row.payload, {"X-Fleetwatch-Event": "order.placed",
                                                "X-Fleetwatch-Delivery": str(row.id)}, cfg.timeout_s)
                    values = {"status": "delivered", "attempts": attempts, "delivered_at": now, "last_error": None}
                except Exception as exc:  # any failure of the receiver is retried, never fatal
                    final = attempts >= cfg.max_attempts
                    delay = timedelta(seconds=min(cfg.backoff_s * 2 ** (attempts - 1), 600))
                    values = {"status": "failed" if final else "pending", "attempts": attempts,
                              "next_attempt_at": now + delay, "last_error": f"{type(exc).__name__}: {exc}"[:500]}
                    log.warning("webhook for order %s failed (attempt %d): %s", row.order_id, attempts, exc)
            session.execute(update(order_webhooks).where(order_webhooks.c.id == row.id).values(**values))
            done += 1
        session.commit()
    return done


class Dispatcher:
    """A daemon thread that keeps relaying the API outbox and delivering webhooks; survives Kafka being down."""

    def __init__(self, sessions: sessionmaker[Session], producer_factory: Callable[[], Producer] | None,
                 webhook: WebhookConfig, interval_s: float = 0.5) -> None:
        self.sessions = sessions
        self.producer_factory = producer_factory
        self.webhook = webhook
        self.interval_s = interval_s
        self.producer: Producer | None = None
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._run, name="orders-dispatch", daemon=True)

    def start(self) -> None:
        """Start the background thread."""
        self.thread.start()

    def poke(self) -> None:
        """Ask for an immediate pass (after an order changed)."""
        self.wake.set()

    def run_once(self) -> None:
        """One pass: relay the outbox (when Kafka is reachable), then due webhooks."""
        if self.producer_factory is not None:
            try:
                if self.producer is None:
                    self.producer = self.producer_factory()
                relay_outbox(self.sessions, self.producer)
            except Exception as exc:  # Kafka down: rows stay in the outbox and go out on a later pass
                log.warning("orders relay: %s; will retry", exc)
                self._drop_producer()
        try:
            deliver_webhooks(self.sessions, self.webhook)
        except Exception as exc:
            log.warning("webhook delivery pass failed: %s", exc)

    def _drop_producer(self) -> None:
        if self.producer is not None:
            try:
                self.producer.close(timeout=1)
            except Exception:
                pass
            self.producer = None

    def _run(self) -> None:
        while not self.stop_event.is_set():
            self.run_once()
            self.wake.wait(self.interval_s * 10 if self.producer is None and self.producer_factory else
                           self.interval_s)
            self.wake.clear()

    def stop(self) -> None:
        """Stop the thread and close the producer."""
        self.stop_event.set()
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        self._drop_producer()


def kafka_producer_factory(bootstrap: str, bootstrap_timeout_ms: int = 5000) -> Callable[[], Producer]:
    """Factory for an idempotent, acks=all producer (created lazily so the API starts without Kafka)."""
    def make() -> Producer:
        from kafka import KafkaProducer

        return KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,  # type: ignore
                             linger_ms=5, max_block_ms=5000, request_timeout_ms=10000,
                             bootstrap_timeout_ms=bootstrap_timeout_ms)
    return make

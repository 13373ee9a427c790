"""Outbox against real Kafka: the API process dies after the database commit, before the publish."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from kafka import KafkaConsumer, TopicPartition
from ordering_fixtures import alert, free_port_for_tests
from sqlalchemy import func, select

from fleetwatch.db import upgrade
from fleetwatch.pipeline import ensure_topics
from fleetwatch.settings import Settings
from functions import store
from functions.db import make_engine, make_sessions
from ordering.auth import create_token
from ordering.dispatch import API_SOURCE
from ordering.lifecycle import outbox_emitter
from ordering.place import place

pytestmark = pytest.mark.services
FLEETWATCH = str(Path(sys.executable).with_name("fleetwatch"))


def orders_on_kafka(s: Settings) -> list[dict[str, object]]:
    """Every message on the (prefixed) ``orders`` topic, from the beginning."""
    topic = s.topic("orders")
    consumer = KafkaConsumer(bootstrap_servers=s.bootstrap, enable_auto_commit=False, consumer_timeout_ms=3000)
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        return [json.loads(m.value) for m in consumer]
    finally:
        consumer.close()


class ApiProcess:
    """``fleetwatch api serve`` as a child process we can SIGKILL."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.port = port
        self.log = log.open("ab")
        self.proc = subprocess.Popen([FLEETWATCH, "api", "serve"], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, f"api exited; see {log}"
            assert time.monotonic() < deadline, f"api did not start; see {log}"
            time.sleep(0.2)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture()
def api_env(isolated: Settings, pg_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for API processes on a fresh PostgreSQL database with one placed order."""
    upgrade(pg_url)
    ensure_topics(isolated)
    engine = make_engine(pg_url)
    sessions = make_sessions(engine)
    with sessions() as session:
        place(session, alert("T00001", "OIL-PUMP", "oil_pressure_kpa"), outbox_emitter(session, "ordering-place"))
        _, secret = create_token(session, "operator", "crash test")
        session.commit()
    env = {**os.environ, "FLEETWATCH_DATABASE_URL": pg_url, "FLEETWATCH_API_PORT": str(free_port_for_tests()),
           "FLEETWATCH_API_DEMO_TOKEN": "false", "FLEETWATCH_RUN_DIR": str(tmp_path), "OPERATOR_TOKEN": secret}
    yield env
    engine.dispose()


def test_event_committed_before_a_crash_is_published_exactly_once_after_restart(
        isolated: Settings, api_env: dict[str, str], tmp_path: Path) -> None:
    port = int(api_env["FLEETWATCH_API_PORT"])
    engine = make_engine(api_env["FLEETWATCH_DATABASE_URL"])
    pending = select(func.count()).select_from(store.outbox).where(store.outbox.c.source == API_SOURCE)

    # 1. The relay is held back, so the process is killed after its commit and before any publish.
    first = ApiProcess({**api_env, "FLEETWATCH_API_RELAY": "false"}, port, tmp_path / "api.log")
    r = httpx.post(f"http://127.0.0.1:{port}/api/orders/1/transitions", json={"to": "acknowledged"},
                   headers={"Authorization": f"Bearer {api_env['OPERATOR_TOKEN']}"}, timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "acknowledged"
    first.kill()
    with engine.connect() as conn:
        assert conn.execute(pending).scalar_one() == 1
    assert orders_on_kafka(isolated) == []

    # 2. After a restart the relay publishes the committed change once and removes it from the outbox.
    second = ApiProcess(api_env, port, tmp_path / "api.log")
    deadline = time.monotonic() + 30
    with engine.connect() as conn:
        while conn.execute(pending).scalar_one():
            assert time.monotonic() < deadline, "the outbox was not relayed"
            time.sleep(0.3)
    second.kill()

    # 3. Another restart finds nothing left to publish: still exactly one event.
    third = ApiProcess(api_env, port, tmp_path / "api.log")
    time.sleep(2)
    third.kill()
    engine.dispose()
    events = orders_on_kafka(isolated)
    assert [(e["event"], e["order"]["id"], e["order"]["status"]) for e in events] == [(  # type: ignore[index]
        "acknowledged", 1, "acknowledged")]
    assert events[0]["actor"] == "api:crash test"

"""Topic setup and pipeline progress: end offsets, function lag, waiting for the stream to drain."""

from __future__ import annotations

import time
from collections.abc import Callable

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from sqlalchemy import func, select

from fleetwatch.settings import Settings
from functions import store
from functions.config import FunctionConfig, load_functions
from functions.db import make_engine, make_sessions

BASE_TOPICS = ("telemetry", "telemetry.dlq", "wear-alerts", "orders")


def all_topics(functions: dict[str, FunctionConfig]) -> list[str]:
    """Logical names of every topic the pipeline uses."""
    names = list(BASE_TOPICS)
    for fn in functions.values():
        names += [t for t in fn.source_topics if t not in names]
        if fn.failure_topic not in names:
            names.append(fn.failure_topic)
    return names


def ensure_topics(s: Settings) -> list[str]:
    """Create missing topics with the configured partitions and replication; returns physical names."""
    names = [s.topic(t) for t in all_topics(load_functions(s.functions_path))]
    admin = KafkaAdminClient(bootstrap_servers=s.bootstrap, request_timeout_ms=30_000)
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(n, s.kafka_partitions, s.kafka_replication) for n in names if n not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
    return names


def end_offsets(s: Settings, topic: str) -> dict[int, int]:
    """Next offset to be written, per partition of a physical topic."""
    consumer = KafkaConsumer(bootstrap_servers=s.bootstrap)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        return {tp.partition: o for tp, o in consumer.end_offsets(tps).items()} if tps else {}
    finally:
        consumer.close()


class Progress:
    """Reads how far each function got, from the database where it stores its offsets."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.functions = load_functions(s.functions_path)
        self.engine = make_engine(s.db_url)
        self.sessions = make_sessions(self.engine)

    def lag(self, name: str) -> int:
        """Records not yet processed by function ``name`` (all partitions of all its sources)."""
        fn = self.functions[name]
        group = self.s.topic(fn.group)
        total = 0
        with self.sessions() as session:
            for logical in fn.source_topics:
                topic = self.s.topic(logical)
                done = store.load_offsets(session, group, topic)
                for p, end in end_offsets(self.s, topic).items():
                    total += max(end - done.get(p, 0), 0)
        return total

    def outbox_pending(self) -> int:
        """Outbox rows not yet published."""
        with self.sessions() as session:
            return int(session.execute(select(func.count()).select_from(store.outbox)).scalar_one())

    def close(self) -> None:
        """Release the database engine."""
        self.engine.dispose()


def wait_drained(s: Settings, expected_telemetry: int, baseline: int = 0, timeout: float = 600.0,
                 report: Callable[[str], None] | None = None) -> None:
    """Block until Kafka holds the expected telemetry and every function has caught up."""
    progress = Progress(s)
    deadline = time.monotonic() + timeout
    calm = 0
    try:
        while time.monotonic() < deadline:
            stored = sum(end_offsets(s, s.topic("telemetry")).values()) - baseline
            lags = {name: progress.lag(name) for name in progress.functions}
            pending = progress.outbox_pending()
            if report:
                report(f"telemetry in Kafka {stored}/{expected_telemetry}, lag {lags}, outbox {pending}")
            if stored >= expected_telemetry and not any(lags.values()) and pending == 0:
                calm += 1
                if calm >= 3:  # stable across polls: alerts emitted at the end have been ordered too
                    return
            else:
                calm = 0
            time.sleep(1.0)
        raise TimeoutError(f"pipeline did not drain within {timeout:.0f}s (lag {lags}, outbox {pending})")
    finally:
        progress.close()

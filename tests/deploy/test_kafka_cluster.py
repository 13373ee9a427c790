"""A 3-node KRaft cluster started by fleetwatch.stack survives a kill -9 of a partition leader."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic

from fleetwatch.settings import PROJECT_ROOT, Settings
from fleetwatch.stack import Stack

pytestmark = pytest.mark.services
RECORDS = 3000


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Settings, Stack]]:
    """Three Kafka nodes on their own ports and run folder (replication factor 3, min ISR 2)."""
    s = Settings(run_dir=PROJECT_ROOT / ".run" / "test-cluster", kafka_brokers=3, kafka_min_insync=2,
                 kafka_port=19192, kafka_controller_port=19193, kafka_replication=3)
    stack = Stack(s)
    stack.down()
    stack.start(["kafka"])
    try:
        yield s, stack
    finally:
        stack.down()


def _leader(admin: KafkaAdminClient, topic: str) -> int:
    desc = admin.describe_topics([topic])[0]
    return next(p["leader_id"] for p in desc["partitions"] if p["partition_index"] == 0)


def test_killing_the_partition_leader_loses_nothing(cluster: tuple[Settings, Stack]) -> None:
    s, stack = cluster
    topic = f"replicated-{int(time.time())}"
    admin = KafkaAdminClient(bootstrap_servers=s.bootstrap)
    admin.create_topics([NewTopic(topic, 1, 3, topic_configs={"min.insync.replicas": "2"})])
    time.sleep(1)
    victim = _leader(admin, topic)
    producer = KafkaProducer(bootstrap_servers=s.bootstrap, acks="all", enable_idempotence=True, retries=2**31 - 1,
                             delivery_timeout_ms=120_000, linger_ms=5)
    futures = []

    def produce() -> None:
        for i in range(RECORDS):
            futures.append(producer.send(topic, key=b"k", value=str(i).encode()))
            time.sleep(0.002)

    writer = threading.Thread(target=produce)
    writer.start()
    time.sleep(1.5)
    stack.signal(f"kafka-{victim}", "KILL")  # kill -9 of the leader mid-stream; supervisord restarts it
    writer.join()
    for f in futures:
        f.get(timeout=120)  # every send was acknowledged by the in-sync replicas
    producer.close()
    new_leader = _leader(admin, topic)
    admin.close()

    consumer = KafkaConsumer(topic, bootstrap_servers=s.bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=10_000)
    values = [int(m.value) for m in consumer]
    consumer.close()
    assert new_leader != victim or stack.status()[f"kafka-{victim}"] == "RUNNING"
    assert sorted(values) == list(range(RECORDS)), "records lost or duplicated across the leader failover"
    assert values == list(range(RECORDS)), "per-partition order broken"

"""A Kafka consumer-group member that feeds an Invoker and relays the function's outbox."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from functions import store
from functions.config import FunctionConfig
from functions.model import Record
from functions.runtime import Invoker, json_failure_sink, load_handler

log = logging.getLogger("fleetwatch.functions")


class DbCheckpointer:
    """Stores offsets in the database, in the same transaction as the handler's writes."""

    def __init__(self, group: str) -> None:
        self.group = group

    def commit(self, session: Session | None, offsets: dict[tuple[str, int], int]) -> None:
        """Upsert offsets and commit the session's transaction."""
        assert session is not None, "a transactional function needs a database session"
        store.save_offsets(session, self.group, offsets)
        session.commit()


class KafkaCheckpointer:
    """Commits offsets to Kafka (for functions without database effects)."""

    def __init__(self, consumer: KafkaConsumer) -> None:
        self.consumer = consumer

    def commit(self, session: Session | None, offsets: dict[tuple[str, int], int]) -> None:
        """Synchronously commit offsets to the consumer group."""
        self.consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()})


class _Seeker(ConsumerRebalanceListener):
    """On assignment, resume each partition from the database's offsets or the starting position."""

    def __init__(self, worker: KafkaWorker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        log.info("%s: partitions revoked %s", self.worker.fn.name, sorted((tp.topic, tp.partition) for tp in revoked))

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        log.info("%s: partitions assigned %s", self.worker.fn.name, sorted((tp.topic, tp.partition) for tp in assigned))
        self.worker.seek(list(assigned))


class KafkaWorker:
    """Runs one function as a member of its consumer group until stopped."""

    def __init__(self, fn: FunctionConfig, bootstrap: str, sessions: sessionmaker[Session] | None,
                 topic_prefix: str = "") -> None:
        self.fn = fn
        self.prefix = topic_prefix
        self.sessions = sessions if fn.transactional else None
        self.stop_event = threading.Event()
        self.topics = [self.topic(t) for t in fn.source_topics]
        self.group = self.topic(fn.group)
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=self.group, enable_auto_commit=False,
            auto_offset_reset="latest" if fn.starting_position == "LATEST" else "earliest",
            max_poll_records=fn.batch_size, max_poll_interval_ms=max(300_000, int(fn.timeout_s * 4000)),
            fetch_max_wait_ms=100, session_timeout_ms=20_000, heartbeat_interval_ms=3_000,
            client_id=f"{self.group}-worker",
        )
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                      linger_ms=5)
        checkpointer = DbCheckpointer(self.group) if self.sessions else KafkaCheckpointer(self.consumer)
        send = self._send_sync
        self.invoker = Invoker(fn, load_handler(fn.handler), checkpointer, json_failure_sink(send, fn, self.topic),
                               self.sessions, self.topic, self.relay)

    def topic(self, name: str) -> str:
        """Physical topic (or group) name for a logical one."""
        return f"{self.prefix}{name}"

    def _send_sync(self, topic: str, key: bytes | None, value: bytes) -> None:
        self.producer.send(topic, key=key, value=value).get(timeout=60)

    def seek(self, partitions: list[TopicPartition]) -> None:
        """Position partitions at the stored offsets, else at the starting position."""
        stored: dict[tuple[str, int], int] = {}
        if self.sessions:
            with self.sessions() as session:
                for topic in {tp.topic for tp in partitions}:
                    stored.update({(topic, p): o for p, o in store.load_offsets(session, self.group, topic).items()})
        fresh = [tp for tp in partitions if (tp.topic, tp.partition) not in stored]
        for tp in partitions:
            if (tp.topic, tp.partition) in stored:
                self.consumer.seek(tp, stored[(tp.topic, tp.partition)])
        if not fresh or not self.sessions:
            return
        if self.fn.starting_position == "TRIM_HORIZON":
            self.consumer.seek_to_beginning(*fresh)
        elif self.fn.starting_position == "LATEST":
            self.consumer.seek_to_end(*fresh)
        else:
            ts = int((self.fn.starting_position_timestamp or datetime.now(UTC)).timestamp() * 1000)
            found = self.consumer.offsets_for_times(dict.fromkeys(fresh, ts))
            for tp in fresh:
                hit = found.get(tp)
                if hit is None:
                    self.consumer.seek_to_end(tp)
                else:
                    self.consumer.seek(tp, hit.offset)

    def relay(self) -> None:
        """Publish this function's outbox rows, then delete them (at-least-once; ids let readers dedupe)."""
        if not self.sessions:
            return
        while True:
            with self.sessions() as session:
                rows = store.pending(session, self.fn.name)
                if not rows:
                    return
                futures = [self.producer.send(r.topic, key=r.key, value=r.value,
                                              headers=[(k, v.encode()) for k, v in (r.headers or {}).items()])
                           for r in rows]
                for f in futures:
                    f.get(timeout=60)
                store.remove(session, [r.id for r in rows])
                session.commit()

    def _poll_batch(self) -> list[Record]:
        deadline = time.monotonic() + self.fn.maximum_batching_window_s
        batch: list[Record] = []
        while len(batch) < self.fn.batch_size and not self.stop_event.is_set():
            left = deadline - time.monotonic()
            polled = self.consumer.poll(timeout_ms=max(int(left * 1000), 0) if batch else 500,
                                        max_records=self.fn.batch_size - len(batch))
            for recs in polled.values():
                batch.extend(Record(m.topic, m.partition, m.offset, m.timestamp, m.key, m.value,
                                    tuple((k, v or b"") for k, v in (m.headers or [])))
                             for m in recs)
            if batch and time.monotonic() >= deadline:
                break
        batch.sort(key=lambda r: (r.topic, r.partition, r.offset))
        return batch

    def run(self) -> None:
        """Consume until ``stop_event`` is set."""
        self.consumer.subscribe(self.topics, listener=_Seeker(self))
        self.relay()
        log.info("%s: consuming %s as group %s", self.fn.name, self.topics, self.group)
        while not self.stop_event.is_set():
            batch = self._poll_batch()
            if not batch:
                continue
            try:
                self.invoker.process(batch)
            except OperationalError as exc:
                log.error("%s: database unavailable (%s); rewinding to the stored offsets", self.fn.name, exc)
                time.sleep(2)
                self.seek(list(self.consumer.assignment()))
                continue
            offsets = {TopicPartition(r.topic, r.partition): OffsetAndMetadata(r.offset + 1, "", -1) for r in batch}
            if self.sessions:
                self.consumer.commit_async(offsets)  # for lag visibility only; the database is authoritative

    def close(self) -> None:
        """Leave the group and release clients."""
        self.stop_event.set()
        try:
            self.consumer.close(autocommit=False)
        finally:
            self.producer.close(timeout=5)

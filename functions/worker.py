"""A Kafka consumer-group member that feeds an Invoker and relays the function's outbox."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from functions import store
from functions.config import FunctionConfig
from functions.model import Handler, Record
from functions.runtime import TP, DbCheckpointer, Fenced, Invoker, Stopped, Window, load_handler

log = logging.getLogger("fleetwatch.functions")


STALL_S = 30.0  # how long a consumer may stay outside its group before it is replaced


class AsyncCommitter:
    """Commits offsets to Kafka asynchronously, one request in flight at a time (newer offsets wait and merge)."""

    def __init__(self, consumer: KafkaConsumer) -> None:
        self.consumer = consumer
        self._waiting: dict[TopicPartition, OffsetAndMetadata] = {}
        self._inflight = False
        self._lock = threading.Lock()

    def commit(self, offsets: dict[TP, int]) -> None:
        """Queue offsets; send them now unless a commit is still in flight."""
        with self._lock:
            self._waiting.update({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()})
            if self._inflight or not self._waiting:
                return
            batch, self._waiting, self._inflight = self._waiting, {}, True
        try:
            self.consumer.commit_async(batch, callback=self._done)
        except KafkaError as exc:
            self._done(batch, exc)

    def _done(self, offsets: Any, response: Any) -> None:
        with self._lock:
            self._inflight = False
        if isinstance(response, Exception):
            # Only means these records are delivered again after a restart (at-least-once).
            log.warning("offset commit to Kafka failed: %s", response)


class KafkaCheckpointer:
    """Commits offsets to Kafka (for functions without database effects); window state stays in memory."""

    def __init__(self, committer: AsyncCommitter) -> None:
        self.committer = committer

    def commit(self, session: Session | None, offsets: dict[TP, int], expected: dict[TP, int | None],
               windows: dict[TP, Window | None]) -> None:
        """Commit offsets to the consumer group after the batch (asynchronously; synchronously at close)."""
        if offsets:
            self.committer.commit(offsets)


class _Rebalance(ConsumerRebalanceListener):
    """Hands partitions to and from the Invoker, positioned at the durable offsets."""

    def __init__(self, worker: KafkaWorker) -> None:
        self.worker = worker

    # kafka-python runs these on its IO thread, where blocking consumer calls are not allowed: assigned
    # partitions are paused here and positioned by the worker's own thread before they are read.
    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        self.worker.generation += 1
        self.worker.unpositioned.difference_update(revoked)
        tps = sorted((tp.topic, tp.partition) for tp in revoked)
        self.worker.invoker.revoke(tps)
        if tps:
            log.info("%s[%s]: partitions revoked %s", self.worker.fn.name, self.worker.worker_id, tps)

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self.worker.generation += 1
        tps = sorted((tp.topic, tp.partition) for tp in assigned)
        log.info("%s[%s]: partitions assigned %s", self.worker.fn.name, self.worker.worker_id, tps)
        if assigned:
            self.worker.consumer.pause(*assigned)
            self.worker.unpositioned.update(assigned)


class KafkaWorker:
    """Runs one function as a member of its consumer group until stopped."""

    def __init__(self, fn: FunctionConfig, bootstrap: str, sessions: sessionmaker[Session] | None,
                 topic_prefix: str = "", worker_id: str | None = None, handler: Handler | None = None) -> None:
        self.fn = fn
        self.prefix = topic_prefix
        self.log_sessions = sessions
        self.sessions = sessions if fn.transactional else None
        self.worker_id = worker_id or f"{os.uname().nodename}:{os.getpid()}"
        self.stop_event = threading.Event()
        self.generation = 0
        self.unpositioned: set[TopicPartition] = set()  # assigned, paused, not yet positioned
        self.topics = [self.topic(t) for t in fn.source_topics]
        self.group = self.topic(fn.group)
        self.bootstrap = bootstrap
        self.consumer = self._new_consumer()
        self.unsettled_since: float | None = None
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
        self.committer = AsyncCommitter(self.consumer)
        checkpointer = DbCheckpointer(self.group) if self.sessions else KafkaCheckpointer(self.committer)
        self.invoker = Invoker(fn, handler or load_handler(fn.handler), checkpointer, self.sessions,
                               log_sessions=self.log_sessions, send=self._send_sync, topic=self.topic,
                               publish=self.relay, group=self.group, worker=self.worker_id,
                               should_stop=self.stop_event.is_set)

    def _new_consumer(self) -> KafkaConsumer:
        fn = self.fn
        return KafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group, enable_auto_commit=False,
            auto_offset_reset="latest" if fn.starting_position == "LATEST" else "earliest",
            max_poll_records=fn.batch_size, max_poll_interval_ms=max(300_000, int(fn.timeout_s * 4000)),
            fetch_max_wait_ms=100, session_timeout_ms=15_000, metadata_max_age_ms=15_000, heartbeat_interval_ms=3_000,
            client_id=f"{self.group}-{self.worker_id}",
        )

    def _check_membership(self) -> None:
        """Replace a consumer stuck outside its group: kafka-python 3.0 can stall for good after a rebalance.

        A member that is merely idle (more workers than partitions) is settled and left alone; one that has not
        been settled (STABLE, no rejoin pending, coordinator known) for STALL_S gets a fresh consumer. Offsets
        live in the database (or were committed), so nothing is lost or read twice beyond the usual redelivery.
        """
        coordinator = getattr(self.consumer, "_coordinator", None)
        state = getattr(getattr(coordinator, "state", None), "name", "STABLE")
        # Seen stuck here: state still STABLE, but the coordinator marked dead and a rejoin pending forever.
        settled = (state == "STABLE" and not getattr(coordinator, "rejoin_needed", False)
                   and getattr(coordinator, "coordinator_id", 0) is not None)
        now = time.monotonic()
        if settled:
            self.unsettled_since = None
            return
        if self.unsettled_since is None:
            self.unsettled_since = now
            return
        if now - self.unsettled_since < STALL_S:
            return
        log.warning("%s[%s]: consumer not back in group %s after %.0fs (state %s); replacing it",
                    self.fn.name, self.worker_id, self.group, now - self.unsettled_since, state)
        self.unsettled_since = None
        try:
            self.consumer.close(autocommit=False)
        except Exception as exc:  # noqa: BLE001 - the old client is being discarded anyway
            log.warning("%s: closing the stuck consumer failed: %s", self.fn.name, exc)
        self.consumer = self._new_consumer()
        self.committer.consumer = self.consumer
        self.unpositioned.clear()
        self.generation += 1
        self.consumer.subscribe(self.topics, listener=_Rebalance(self))

    def topic(self, name: str) -> str:
        """Physical topic (or group) name for a logical one."""
        return f"{self.prefix}{name}"

    def _send_sync(self, topic: str, key: bytes | None, value: bytes) -> None:
        self.producer.send(topic, key=key, value=value).get(timeout=60)

    # ------------------------------------------------------------------ positions
    def seek(self, partitions: list[TopicPartition]) -> None:
        """Position partitions at the durable offsets, else at the starting position; tell the Invoker."""
        if not partitions:
            return
        stored: dict[TP, int] = {}
        windows: dict[TP, Window] = {}
        if self.sessions:
            with self.sessions() as session:
                for topic in {tp.topic for tp in partitions}:
                    stored.update({(topic, p): o for p, o in store.load_offsets(session, self.group, topic).items()})
                    windows.update({(topic, p): w
                                    for p, w in store.load_window_states(session, self.group, topic).items()})
        else:
            for tp in partitions:
                committed = self.consumer.committed(tp)
                if committed is not None:
                    stored[(tp.topic, tp.partition)] = committed
        fresh = [tp for tp in partitions if (tp.topic, tp.partition) not in stored]
        for tp in partitions:
            if (tp.topic, tp.partition) in stored:
                self.consumer.seek(tp, stored[(tp.topic, tp.partition)])
        if fresh:
            self._seek_start(fresh)
        owned = {(tp.topic, tp.partition) for tp in partitions}
        self.invoker.assign({tp: stored.get(tp) for tp in owned},
                            {tp: w for tp, w in windows.items() if tp in owned})
        if fresh and self.sessions and self.fn.starting_position != "TRIM_HORIZON":
            self._remember_start(fresh)

    def _seek_start(self, fresh: list[TopicPartition]) -> None:
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

    def _remember_start(self, fresh: list[TopicPartition]) -> None:
        """Store a LATEST / AT_TIMESTAMP start right away, so a restart does not move it past unread records."""
        assert self.sessions is not None
        offsets = {(tp.topic, tp.partition): self.consumer.position(tp) for tp in fresh}
        with self.sessions() as session:
            try:
                store.advance_offsets(session, self.group, offsets, dict.fromkeys(offsets))
                session.commit()
            except Fenced:
                session.rollback()
                return
        self.invoker.positions.update(offsets)

    # ------------------------------------------------------------------ outbox
    def relay(self) -> None:
        """Publish this function's outbox rows in order, then delete them (at-least-once; ids let readers dedupe)."""
        if not self.sessions:
            return
        table = store.outbox
        while True:
            with self.sessions() as session:
                # FOR UPDATE (ignored by SQLite) keeps two members of one function from publishing the same rows.
                rows = list(session.execute(select(table).where(table.c.source == self.fn.name)
                                            .order_by(table.c.id).limit(1000).with_for_update()))
                if not rows:
                    return
                futures = [self.producer.send(r.topic, key=r.key, value=r.value,
                                              headers=[(k, str(v).encode()) for k, v in (r.headers or {}).items()])
                           for r in rows]
                for f in futures:
                    f.get(timeout=60)
                store.remove(session, [r.id for r in rows])
                session.commit()

    # ------------------------------------------------------------------ loop
    def _poll_batch(self) -> list[Record]:
        """Up to batch_size records, waiting at most the batching window once the first record arrived."""
        deadline = time.monotonic() + self.fn.maximum_batching_window_s
        batch: list[Record] = []
        generation = self.generation
        while len(batch) < self.fn.batch_size and not self.stop_event.is_set():
            left = deadline - time.monotonic()
            polled = self.consumer.poll(timeout_ms=max(int(left * 1000), 0) if batch else 200,
                                        max_records=self.fn.batch_size - len(batch))
            for recs in polled.values():
                batch.extend(Record(m.topic, m.partition, m.offset, m.timestamp, m.key, m.value or b"",
                                    tuple((k, v or b"") for k, v in m.headers) if m.headers else ())
                             for m in recs)
            if self.generation != generation or self.unpositioned:
                # A rebalance happened inside poll(): start the batch over from a clean state.
                self._unread(batch)
                if self.unpositioned:
                    self._position_assigned()
                batch, generation = [], self.generation
                continue
            if not batch or time.monotonic() >= deadline:
                break
        batch.sort(key=lambda r: (r.topic, r.partition, r.offset))
        return batch

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Consume until ``stop_event`` is set (or ``until()`` returns True)."""
        for topic in self.topics:  # metadata first: a group leader without it would assign nothing
            if not self.consumer.partitions_for_topic(topic):
                log.warning("%s: source topic %s does not exist (yet)", self.fn.name, topic)
        self.consumer.subscribe(self.topics, listener=_Rebalance(self))
        self.relay()
        log.info("%s[%s]: consuming %s as group %s", self.fn.name, self.worker_id, self.topics, self.group)
        while not self.stop_event.is_set() and not (until and until()):
            try:
                batch = self._poll_batch()
                self._check_membership()
                if batch:
                    self.invoker.process(batch)
                busy = {(r.topic, r.partition) for r in batch}
                if not batch:
                    self.invoker.flush_logs()
                self.invoker.tick({(tp.topic, tp.partition) for tp in self.consumer.assignment()} - busy)
                if not batch:
                    continue
            except Fenced as exc:
                log.warning("%s[%s]: %s; re-reading positions", self.fn.name, self.worker_id, exc)
                self._rewind()
                continue
            except Stopped:
                break
            except OperationalError as exc:
                log.error("%s: database unavailable (%s); rewinding to the stored offsets", self.fn.name, exc)
                self.stop_event.wait(2)
                self._rewind()
                continue
            if self.sessions and batch:  # lag visibility for Kafka tools only; the database is authoritative
                self.committer.commit({tp: o for tp, o in self.invoker.positions.items() if o is not None})

    def _unread(self, batch: list[Record]) -> None:
        """Put the consumer back to the first record of ``batch`` on each partition it still owns."""
        first: dict[TopicPartition, int] = {}
        for r in batch:
            tp = TopicPartition(r.topic, r.partition)
            first[tp] = min(first.get(tp, r.offset), r.offset)
        owned = self.consumer.assignment()
        for tp, offset in first.items():
            if tp in owned and tp not in self.unpositioned:
                self.consumer.seek(tp, offset)

    def _position_assigned(self) -> None:
        """Seek newly assigned partitions to their durable offsets, then let them be read."""
        partitions = [tp for tp in self.unpositioned if tp in self.consumer.assignment()]
        self.seek(partitions)
        self.unpositioned.clear()
        if partitions:
            self.consumer.resume(*partitions)

    def _rewind(self) -> None:
        try:
            self.seek(list(self.consumer.assignment()))
        except OperationalError as exc:
            log.error("%s: database still unavailable (%s)", self.fn.name, exc)

    def close(self) -> None:
        """Leave the group and release clients."""
        self.stop_event.set()
        try:
            self.invoker.flush_logs()
        except OperationalError as exc:
            log.error("%s: invocation logs not written: %s", self.fn.name, exc)
        owned = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
                 for (t, p), o in self.invoker.positions.items() if o is not None}
        if owned and not self.sessions:
            try:
                self.consumer.commit(owned)
            except (CommitFailedError, KafkaError) as exc:
                log.warning("%s: final offset commit failed: %s", self.fn.name, exc)
        try:
            self.consumer.close(autocommit=False)
        finally:
            self.producer.close(timeout=5)

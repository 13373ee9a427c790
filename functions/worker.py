"""A Kafka consumer-group member (librdkafka) that feeds an Invoker and relays the function's outbox."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from functions import store
from functions.config import FunctionConfig
from functions.model import Handler, Record
from functions.runtime import TP, DbCheckpointer, Fenced, Invoker, Stopped, Window, load_handler

log = logging.getLogger("fleetwatch.functions")
kafka_log = logging.getLogger("fleetwatch.functions.kafka")

IDLE_POLL_S = 0.2  # longest a consume() call blocks, so a stop request is seen quickly
IDLE_RELAY_S = 5.0  # how often an idle worker looks for outbox rows it did not write itself
SEND_TIMEOUT_S = 60.0


class KafkaCommitter:
    """Commits offsets to the group asynchronously (librdkafka merges and orders the requests)."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer

    def commit(self, offsets: dict[TP, int], wait: bool = False) -> None:
        """Commit the given next offsets, queued (or synchronously with ``wait``, at revoke and close).

        A failure is logged, never raised: it only means redelivery after a restart.
        """
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                 asynchronous=not wait)
        except KafkaException as exc:
            log.warning("offset commit to Kafka failed: %s", exc)


class KafkaCheckpointer:
    """Commits offsets to Kafka (for functions without database effects); window state stays in memory."""

    def __init__(self, committer: KafkaCommitter) -> None:
        self.committer = committer

    def commit(self, session: Session | None, offsets: dict[TP, int], expected: dict[TP, int | None],
               windows: dict[TP, Window | None]) -> None:
        """Commit offsets to the consumer group after the batch (asynchronously; synchronously at revoke/close)."""
        if offsets:
            self.committer.commit(offsets)


def _committed(err: KafkaError | None, partitions: list[TopicPartition]) -> None:
    if err is not None and err.code() != KafkaError._NO_OFFSET:
        log.warning("offset commit to Kafka failed: %s", err)


def tune_gc(full_every: int) -> None:
    """Garbage-collection settings of a worker process: startup objects frozen, full collections rare.

    Call once the process has imported and connected (what exists then lives as long as the process).
    ``full_every`` is CPython's third threshold (0 keeps its default).
    """
    gc.freeze()
    if full_every > 0:
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, full_every)


class KafkaWorker:
    """Runs one function as a member of its consumer group until stopped.

    Partitions are positioned in the rebalance callback (which librdkafka runs on this thread, inside
    ``consume()``) at the offsets stored in the database, or at the mapping's starting position; Kafka's group
    offsets are written only after the database commit, for lag tools.
    """

    def __init__(self, fn: FunctionConfig, bootstrap: str, sessions: sessionmaker[Session] | None,
                 topic_prefix: str = "", worker_id: str | None = None, handler: Handler | None = None) -> None:
        self.fn = fn
        self.prefix = topic_prefix
        self.log_sessions = sessions
        self.sessions = sessions if fn.transactional else None
        self.worker_id = worker_id or f"{os.uname().nodename}:{os.getpid()}"
        self.stop_event = threading.Event()
        self.generation = 0  # bumped by every assignment change, so a batch spanning one is read again
        self.assigned: set[TP] = set()
        self.unpositioned: set[TP] = set()  # assigned and paused: the database was unreachable at assignment
        self.rewind_pending = False  # a rewind to the stored offsets failed: read nothing until one succeeds
        self.topics = [self.topic(t) for t in fn.source_topics]
        self.group = self.topic(fn.group)
        self.bootstrap = bootstrap
        self.consumer = Consumer(self._consumer_config(), logger=kafka_log)
        self.producer = Producer({
            "bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 5,
            "partitioner": "murmur2_random",  # the Java client's (and kafka-python's) partition for a key
            "client.id": f"{self.group}-{self.worker_id}", "error_cb": self._kafka_error, "log_level": 3,
        }, logger=kafka_log)
        self.committer = KafkaCommitter(self.consumer)
        checkpointer = DbCheckpointer(self.group) if self.sessions else KafkaCheckpointer(self.committer)
        self.invoker = Invoker(fn, handler or load_handler(fn.handler), checkpointer, self.sessions,
                               log_sessions=self.log_sessions, send=self._send_sync, topic=self.topic,
                               publish=self.relay, group=self.group, worker=self.worker_id,
                               should_stop=self.stop_event.is_set)
        self._errors_logged: dict[str, float] = {}
        self._idle_relay = time.monotonic()

    def _consumer_config(self) -> dict[str, Any]:
        fn = self.fn
        return {
            "bootstrap.servers": self.bootstrap, "group.id": self.group, "client.id": f"{self.group}-{self.worker_id}",
            # The database (or our explicit commits) is the source of truth for positions.
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            # Only used when a stored offset is out of range (records deleted by retention).
            "auto.offset.reset": "latest" if fn.starting_position == "LATEST" else "earliest",
            "session.timeout.ms": 15_000, "heartbeat.interval.ms": 3_000,
            "max.poll.interval.ms": max(300_000, int(fn.timeout_s * 4000)),
            "fetch.wait.max.ms": 100, "topic.metadata.refresh.interval.ms": 15_000,
            "on_commit": _committed, "error_cb": self._kafka_error,
            "log_level": 3,  # errors only: connection trouble is reported (rate-limited) through error_cb
        }

    def _kafka_error(self, err: KafkaError) -> None:
        """librdkafka retries by itself; say so at most once a minute per kind of error."""
        now = time.monotonic()
        if now - self._errors_logged.get(err.name(), -60.0) >= 60.0:
            self._errors_logged[err.name()] = now
            log.warning("%s[%s]: Kafka: %s", self.fn.name, self.worker_id, err.str())

    def topic(self, name: str) -> str:
        """Physical topic (or group) name for a logical one."""
        return f"{self.prefix}{name}"

    # ------------------------------------------------------------------ producing
    def _produce_all(self, messages: Iterable[tuple[str, bytes | None, bytes, list[tuple[str, bytes]] | None]]) -> None:
        """Send messages and wait until Kafka acknowledged every one of them (raise KafkaException otherwise)."""
        failed: list[KafkaError] = []
        sent = 0

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failed.append(err)

        for topic, key, value, headers in messages:
            while True:
                try:
                    self.producer.produce(topic, value, key, headers=headers, on_delivery=delivered)
                    break
                except BufferError:  # local queue full: let deliveries drain
                    self.producer.poll(0.1)
            sent += 1
        if not sent:
            return
        left = self.producer.flush(SEND_TIMEOUT_S)
        if failed or left:
            raise KafkaException(failed[0] if failed else KafkaError(KafkaError._MSG_TIMED_OUT))

    def _send_sync(self, topic: str, key: bytes | None, value: bytes) -> None:
        self._produce_all([(topic, key, value, None)])

    # ------------------------------------------------------------------ positions
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.generation += 1
        tps = sorted((tp.topic, tp.partition) for tp in partitions)
        log.info("%s[%s]: partitions assigned %s", self.fn.name, self.worker_id, tps)
        self.assigned = set(tps)
        try:
            consumer.assign(self._positions(tps))
        except (OperationalError, KafkaException) as exc:
            # Take the partitions but read nothing until they can be positioned (_position_paused).
            log.error("%s: cannot position partitions (%s); paused until it works", self.fn.name, exc)
            consumer.assign(partitions)
            consumer.pause(partitions)
            self.unpositioned = set(tps)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = sorted((tp.topic, tp.partition) for tp in partitions)
        if not self.sessions:  # at-least-once functions: hand over where this member got to
            self.committer.commit(self._positions_reached(set(tps)), wait=True)
        if tps:
            log.info("%s[%s]: partitions revoked %s", self.fn.name, self.worker_id, tps)
        self._release(consumer, tps)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = sorted((tp.topic, tp.partition) for tp in partitions)
        log.warning("%s[%s]: partitions lost %s", self.fn.name, self.worker_id, tps)
        self._release(consumer, tps)

    def _settle(self) -> None:
        """Let a pipelined batch finish committing before positions are read or handed over.

        A failed commit is only logged here: the positions are then read from the database, where it left none.
        """
        try:
            self.invoker.drain()
        except (Fenced, OperationalError, KafkaException) as exc:
            log.warning("%s[%s]: %s", self.fn.name, self.worker_id, exc)

    def _release(self, consumer: Consumer, tps: list[TP]) -> None:
        """Give partitions up (revoked or lost): the Invoker forgets them and a batch spanning this is read again."""
        self._settle()
        self.generation += 1
        self.invoker.revoke(tps)
        self.assigned.difference_update(tps)
        self.unpositioned.difference_update(tps)
        consumer.unassign()

    def _positions_reached(self, only: set[TP] | None = None) -> dict[TP, int]:
        """Next offsets this member reached per partition (of ``only``, when given)."""
        return {tp: o for tp, o in self.invoker.positions.items() if o is not None and (only is None or tp in only)}

    def _positions(self, tps: Sequence[TP]) -> list[TopicPartition]:
        """Durable offsets (else the starting position) for ``tps``; hands them and window state to the Invoker."""
        if not tps:
            return []
        self._settle()
        stored: dict[TP, int] = {}
        windows: dict[TP, Window] = {}
        if self.sessions:
            with self.sessions() as session:
                for topic in {t for t, _ in tps}:
                    stored.update({(topic, p): o for p, o in store.load_offsets(session, self.group, topic).items()})
                    windows.update({(topic, p): w
                                    for p, w in store.load_window_states(session, self.group, topic).items()})
        else:
            for tp in self.consumer.committed([TopicPartition(t, p) for t, p in tps], timeout=30):
                if tp.offset >= 0:
                    stored[(tp.topic, tp.partition)] = tp.offset
        fresh = [tp for tp in tps if tp not in stored]
        start = self._start_offsets(fresh)
        owned = set(tps)
        self.invoker.assign({tp: stored.get(tp) for tp in owned}, {tp: w for tp, w in windows.items() if tp in owned})
        if self.sessions:
            self._remember_start({tp: o for tp, o in start.items() if o >= 0})
        return [TopicPartition(t, p, stored.get((t, p), start.get((t, p), OFFSET_BEGINNING))) for t, p in tps]

    def _start_offsets(self, fresh: list[TP]) -> dict[TP, int]:
        """Concrete offsets for the starting position (TRIM_HORIZON stays "beginning": nothing to remember)."""
        if not fresh or self.fn.starting_position == "TRIM_HORIZON":
            return dict.fromkeys(fresh, OFFSET_BEGINNING)
        ends = {tp: self.consumer.get_watermark_offsets(TopicPartition(*tp), timeout=30)[1] for tp in fresh}
        if self.fn.starting_position == "LATEST":
            return ends
        ts = int((self.fn.starting_position_timestamp or datetime.now(UTC)).timestamp() * 1000)
        found = self.consumer.offsets_for_times([TopicPartition(t, p, ts) for t, p in fresh], timeout=30)
        return {(tp.topic, tp.partition): tp.offset if tp.offset >= 0 else ends[(tp.topic, tp.partition)]
                for tp in found}

    def _remember_start(self, offsets: dict[TP, int]) -> None:
        """Store a LATEST / AT_TIMESTAMP start right away, so a restart does not move it past unread records."""
        if not offsets or self.sessions is None:
            return
        with self.sessions() as session:
            try:
                store.advance_offsets(session, self.group, offsets, dict.fromkeys(offsets))
                session.commit()
            except Fenced:
                session.rollback()
                return
        self.invoker.positions.update(offsets)

    def _position_paused(self) -> None:
        """Position partitions that were assigned while the database was down, then let them be read."""
        tps = sorted(self.unpositioned & self.assigned)
        try:
            positions = self._positions(tps)
        except (OperationalError, KafkaException) as exc:
            log.error("%s: still cannot position partitions (%s)", self.fn.name, exc)
            self.stop_event.wait(2)
            return
        self._seek(positions)
        self.unpositioned.clear()
        if positions:
            self.consumer.resume(positions)

    def _seek(self, positions: list[TopicPartition]) -> None:
        for tp in positions:
            try:
                self.consumer.seek(tp)
            except KafkaException as exc:  # not fetching yet: re-assign the whole set at the wanted offsets
                log.info("%s: seek %s-%d failed (%s); re-assigning", self.fn.name, tp.topic, tp.partition, exc)
                wanted = {(p.topic, p.partition): p.offset for p in positions}
                self.consumer.assign([TopicPartition(t, p, wanted.get((t, p), OFFSET_INVALID))
                                      for t, p in sorted(self.assigned)])
                return

    def _rewind(self) -> None:
        """Go back to the durable offsets of every owned partition (after Fenced or a database outage)."""
        try:
            self._seek(self._positions(sorted(self.assigned - self.unpositioned)))
            self.generation += 1
            self.rewind_pending = False
        except OperationalError as exc:
            # Reading on from where the consumer got to would skip the batch that failed (its records would
            # never be handled): the run loop retries the rewind before it reads anything else.
            log.error("%s: database still unavailable (%s)", self.fn.name, exc)
            self.rewind_pending = True

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
                self._produce_all((r.topic, r.key, r.value,
                                   [(k, str(v).encode()) for k, v in (r.headers or {}).items()] or None)
                                  for r in rows)
                store.remove(session, [r.id for r in rows])
                session.commit()

    # ------------------------------------------------------------------ loop
    def _records(self, messages: list[Message], into: dict[TP, list[Record]]) -> None:
        """Turn polled messages into Records, appended per partition (a partition's messages come in order)."""
        last: TP | None = None
        bucket: list[Record] = []
        for m in messages:
            if m.error() is not None:
                self._message_error(m)
                continue
            topic, partition = m.topic(), m.partition()
            if last is None or partition != last[1] or topic != last[0]:
                last = (topic, partition)
                bucket = into.setdefault(last, [])
            headers = m.headers()
            bucket.append(Record(topic, partition, m.offset(), m.timestamp()[1], m.key(), m.value() or b"",
                                 tuple((k, v or b"") for k, v in headers) if headers else ()))

    def _message_error(self, m: Message) -> None:
        err = m.error()
        if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            self._kafka_error(KafkaError(err.code(), f"source topic {m.topic()} does not exist (yet)"))
        else:
            self._kafka_error(err)

    def _poll_batch(self) -> list[Record]:
        """Up to batch_size records, waiting at most the batching window once the first record arrived."""
        size = self.fn.batch_size
        got: dict[TP, list[Record]] = {}
        count, deadline = 0, 0.0
        generation = self.generation
        while count < size and not self.stop_event.is_set():
            # consume() returns once it has all it was asked for, or at the timeout: ask for one record first,
            # then for the rest within the batching window (always once, so a window of 0 takes what is there).
            if count:
                messages = self.consumer.consume(size - count, max(min(deadline - time.monotonic(), IDLE_POLL_S), 0))
            else:
                messages = self.consumer.consume(1, IDLE_POLL_S)
            if self.generation != generation:
                # The assignment changed inside consume(): every owned partition was positioned afresh at its
                # durable offset, so what earlier calls returned is read again; drop it. What this call returned
                # is already from the new positions (librdkafka discards messages of an older assignment).
                got, count, generation = {}, 0, self.generation
            if messages:
                first = not count
                self._records(messages, got)
                count = sum(map(len, got.values()))
                if first and count:
                    deadline = time.monotonic() + self.fn.maximum_batching_window_s
                    continue
            if not count or time.monotonic() >= deadline:
                break
        if len(got) == 1:
            return next(iter(got.values()))
        return [r for tp in sorted(got) for r in got[tp]]

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Consume until ``stop_event`` is set (or ``until()`` returns True)."""
        try:
            known = self.consumer.list_topics(timeout=10).topics
            for topic in self.topics:
                if topic not in known:
                    log.warning("%s: source topic %s does not exist (yet)", self.fn.name, topic)
        except KafkaException as exc:
            log.warning("%s: Kafka metadata unavailable: %s", self.fn.name, exc)
        self.consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        self.relay()
        log.info("%s[%s]: consuming %s as group %s", self.fn.name, self.worker_id, self.topics, self.group)
        while not self.stop_event.is_set() and not (until and until()):
            try:
                if self.rewind_pending:
                    self.stop_event.wait(2)
                    self._rewind()
                    continue
                if self.unpositioned:
                    self._position_paused()
                batch = self._poll_batch()
                if batch:
                    self.invoker.process(batch)
                else:
                    self.invoker.drain()  # a pipelined batch's commit: its outbox rows go out now, not later
                    self.invoker.flush_logs()
                    if time.monotonic() - self._idle_relay >= IDLE_RELAY_S:  # rows a departed member left
                        self._idle_relay = time.monotonic()
                        self.invoker.unpublished = True
                        try:
                            self.invoker.publish_pending()
                        except KafkaException as exc:  # the rows stay in the outbox; tried again later
                            log.warning("%s: outbox relay failed: %s", self.fn.name, exc)
                if self.fn.tumbling_window_s > 0:
                    self.invoker.tick(self.assigned - {(r.topic, r.partition) for r in batch})
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
            if self.sessions:  # lag visibility for Kafka tools only; the database is authoritative
                self.committer.commit(self._positions_reached())

    def close(self) -> None:
        """Leave the group and release clients."""
        self.stop_event.set()
        self._settle()
        try:
            self.invoker.flush_logs()
        except OperationalError as exc:
            log.error("%s: invocation logs not written: %s", self.fn.name, exc)
        try:
            if not self.sessions:
                self.committer.commit(self._positions_reached(), wait=True)
        finally:
            try:
                self.consumer.close()  # leaves the group (runs on_revoke for what this member still owns)
            finally:
                self.producer.flush(5)

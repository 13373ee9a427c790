"""The MQTT→Kafka bridge: validated telemetry to ``telemetry``, rejections to ``telemetry.dlq``, nothing lost.

Delivery: the bridge subscribes at QoS 1 with a persistent MQTT v5 session (clean start off, session
expiry) and acknowledges (PUBACK) a message only after Kafka acknowledged every record made from it
(acks=all, idempotent producer). Acks go out in the order messages arrived, so a record Kafka never
acknowledged holds back every later ack; on a Kafka failure the bridge drops the MQTT connection and the
broker redelivers everything unacknowledged. Memory stays bounded because the broker sends at most
``max_inflight`` unacknowledged messages (MQTT v5 Receive Maximum) and the producer buffer is capped.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import orjson
import paho.mqtt._packet as paho_packet
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.contract import TELEMETRY_TOPIC_FILTER
from ingest.deadletter import dead_letter, encode
from ingest.kafka_out import KafkaSendError, RecordSink, make_sink
from ingest.metrics import BridgeMetrics
from ingest.validate import Limits, Rejection, Verdict, topic_tractor, validate

log = logging.getLogger("fleetwatch.ingest")


@dataclass(frozen=True)
class BridgeConfig:
    """Where the bridge reads from and writes to, and how it identifies itself."""

    mqtt_host: str
    mqtt_port: int
    bootstrap: str
    telemetry_topic: str = "telemetry"
    dlq_topic: str = "telemetry.dlq"
    client_id: str = "fleetwatch-bridge-0"
    # Workers of one group split the stream ($share/<group>/tractors/+/telemetry); None = plain subscription.
    shared_group: str | None = "ingest"
    max_inflight: int = 5000
    session_expiry_s: int = 7 * 24 * 3600
    limits: Limits = field(default_factory=Limits)
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None  # connect with TLS, trusting this CA
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    max_inflight_bytes: int = 64 * 1024 * 1024  # Kafka record bytes not yet acknowledged (memory bound)
    kafka_delivery_timeout_ms: int = 120_000
    kafka_linger_ms: float = 25.0
    kafka_client: str = "auto"  # "confluent" (librdkafka) when installed, else "kafka-python"

    @property
    def subscription(self) -> str:
        """The MQTT topic filter the bridge subscribes to."""
        if self.shared_group:
            return f"$share/{self.shared_group}/{TELEMETRY_TOPIC_FILTER}"
        return TELEMETRY_TOPIC_FILTER


class LeanProperties(Properties):
    """paho's MQTT v5 properties with its constant lookup tables built once, not for every packet.

    paho builds three tables (names, types, which property fits which packet) in every ``Properties()``:
    for each received PUBLISH that cost about as much as validating the payload. The tables never change,
    so instances share one copy; parsing, checks and attributes are paho's own.
    """

    _shared: dict[str, Any] = {}  # the attributes of a fresh paho Properties (its tables), made once

    def __init__(self, packetType: int) -> None:  # noqa: N803 - paho's signature
        if not LeanProperties._shared:
            LeanProperties._shared = dict(vars(Properties(packetType)))
        self.__dict__.update(LeanProperties._shared)
        object.__setattr__(self, "packetType", packetType)

    def clear(self) -> None:
        """Drop every property value (what paho's clear() does, without 27 name rewrites)."""
        for name in [n for n in self.__dict__ if n not in self._shared]:
            del self.__dict__[name]


def use_lean_properties() -> None:
    """Let paho decode incoming PUBLISH properties with ``LeanProperties`` (this process only)."""
    if paho_packet.Properties is Properties:
        paho_packet.Properties = LeanProperties


class BufferedClient(mqtt.Client):
    """paho's client reading the socket 64 KiB at a time and handling every buffered packet per wake-up.

    Stock paho reads a packet with three or four ``recv`` calls (1 byte of type, the length byte by byte,
    then the body) and goes back to ``select`` after each QoS 1 packet: several system calls and a pass of
    its loop per message. Here ``recv`` is served from one big read and ``loop_read`` goes on while that
    read still holds bytes; paho's own packet parser and state machine are unchanged (a packet split across
    reads is completed by the next read exactly as before). Relies on paho 2.x's ``_sock_recv`` hook.
    """

    _READ_SIZE = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self._rsock: object = None  # the socket the buffer came from (a reconnect starts empty)

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rsock is not self._sock:
            self._rsock, self._rbuf, self._rpos = self._sock, b"", 0
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(self._READ_SIZE)  # raises BlockingIOError when nothing is there
            if len(data) <= bufsize:
                self._rbuf, self._rpos = b"", 0
                return data  # b"" means the connection closed
            self._rbuf, self._rpos = data, 0
        start = self._rpos
        self._rpos = start + bufsize
        return self._rbuf[start:self._rpos]

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        """Handle packets until the buffered bytes are used up (select() would not see them)."""
        rc = super().loop_read(max_packets)
        while rc == mqtt.MQTT_ERR_SUCCESS and self._sock is not None and self._rpos < len(self._rbuf):
            rc = super().loop_read(max_packets)
        return rc


class _Pending:
    """One received MQTT message waiting for Kafka to acknowledge its records."""

    __slots__ = ("mid", "qos", "remaining", "started", "generation", "samples", "readings", "dlq", "size")

    def __init__(self, mid: int, qos: int, remaining: int, generation: int, samples: int, readings: int,
                 dlq: bool, size: int) -> None:
        self.mid, self.qos, self.remaining, self.generation = mid, qos, remaining, generation
        self.started = time.monotonic()
        self.samples, self.readings, self.dlq, self.size = samples, readings, dlq, size


class AckTracker:
    """Acknowledges MQTT messages in arrival order, each once all its Kafka records are acknowledged.

    A connection loss starts a new generation: acks still owed for the old connection are dropped, because
    the broker redelivers those messages (and packet ids may be reused on the new connection).
    """

    def __init__(self) -> None:
        self._queue: deque[_Pending] = deque()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self.generation = 0
        self.bytes = 0  # size of Kafka records sent and not yet acknowledged

    def add(self, entry: _Pending) -> None:
        """Track a message before any of its records is sent."""
        with self._lock:
            self._queue.append(entry)
            self.bytes += entry.size

    def wait_for_room(self, limit: int, timeout: float) -> bool:
        """Block while more than ``limit`` record bytes are unacknowledged; False on timeout."""
        if self.bytes <= limit:  # the common case, without the lock: only the caller's own add() raises it
            return True
        with self._room:
            return self._room.wait_for(lambda: self.bytes <= limit, timeout)

    def forget_bytes(self) -> None:
        """The producer holding the unacknowledged records was replaced: nothing is buffered any more."""
        with self._room:
            self.bytes = 0
            self._room.notify_all()

    def record_done(self, entry: _Pending, ack: Any) -> list[_Pending]:  # noqa: ANN401
        """Note one acknowledged record; calls ``ack(entry)`` for every message now complete, in order."""
        released: list[_Pending] = []
        with self._lock:
            entry.remaining -= 1
            if entry.remaining == 0:
                self.bytes = max(self.bytes - entry.size, 0)
                self._room.notify_all()
            if entry.generation != self.generation:
                return released
            queue = self._queue
            while queue and queue[0].remaining <= 0:
                head = queue.popleft()
                ack(head)  # under the lock, so PUBACKs leave in arrival order
                released.append(head)
        return released

    def reset(self) -> int:
        """Forget every pending message (the broker will redeliver them); returns how many were dropped."""
        with self._lock:
            self.generation += 1
            dropped = len(self._queue)
            self._queue.clear()
            return dropped

    def __len__(self) -> int:
        return len(self._queue)


def records_for(verdict: Verdict, topic: str, payload: bytes, received_at: datetime, config: BridgeConfig,
                ) -> list[tuple[str, bytes | None, bytes]]:
    """Kafka (topic, key, value) records for one validated MQTT message: telemetry and/or one DLQ document."""
    records: list[tuple[str, bytes | None, bytes]] = []
    if verdict.message is not None:
        records.append((config.telemetry_topic, verdict.tractor_id.encode(),  # type: ignore[union-attr]
                        orjson.dumps(verdict.message)))  # compact strict JSON (NaN never gets this far)
    if verdict.rejections:
        key_id = verdict.tractor_id or topic_tractor(topic)
        key = key_id.encode()[:64] if key_id else None
        records.append((config.dlq_topic, key,
                        encode(dead_letter(topic, payload, verdict, received_at, config.client_id))))
    return records


class Bridge:
    """One bridge worker: subscribe, validate, produce to Kafka, acknowledge MQTT after Kafka."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self.metrics = BridgeMetrics(config.client_id)
        self.tracker = AckTracker()
        self._stop = threading.Event()
        self._closing = False
        self._retiring = False
        self._last_message = time.monotonic()
        self._kafka_failed = threading.Event()
        self._serving_metrics = False
        self.subscribed = threading.Event()
        self._sink_epoch = 0
        self.sink: RecordSink | None = self._new_sink()
        use_lean_properties()
        self.client = BufferedClient(mqtt.CallbackAPIVersion.VERSION2, client_id=config.client_id,
                                     protocol=mqtt.MQTTv5, manual_ack=True)
        if config.username:
            self.client.username_pw_set(config.username, config.password)
        if config.ca_file:
            self.client.tls_set(ca_certs=config.ca_file)
        self.client.max_inflight_messages_set(config.max_inflight)
        self.client.reconnect_delay_set(1, 10)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    def _new_sink(self) -> RecordSink:
        self._sink_epoch += 1
        failed = partial(self._kafka_failure, self._sink_epoch)
        return make_sink(self.config.kafka_client, self.config.bootstrap, self.config.kafka_delivery_timeout_ms,
                         self.config.max_inflight_bytes * 2, on_fatal=failed, linger_ms=self.config.kafka_linger_ms)

    # ------------------------------------------------------------------ MQTT callbacks
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: Any, reason: Any,  # noqa: ANN401
                    properties: object) -> None:
        if reason.is_failure:
            log.error("MQTT connect refused: %s", reason)
            return
        self.tracker.reset()
        if self._retiring:  # leave the shared group: no new messages, only what the session already holds
            client.unsubscribe(self.config.subscription)
            self._last_message = time.monotonic()
            self.metrics.connected.set(1)
            self.subscribed.set()
        else:
            client.subscribe(self.config.subscription, qos=1)
        log.info("bridge %s connected (session present: %s)", self.config.client_id, flags.session_present)

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, reasons: list[Any],
                      properties: object) -> None:
        if any(r.is_failure for r in reasons):
            log.error("subscription to %s refused: %s", self.config.subscription, [str(r) for r in reasons])
            return
        self.metrics.connected.set(1)
        self.subscribed.set()
        if self.config.metrics_port and not self._serving_metrics:
            # The endpoint opens once subscribed, so `fleetwatch up` can wait for it as the readiness signal.
            self._serving_metrics = self.metrics.serve(self.config.metrics_port, self.config.metrics_host)
        log.info("bridge %s subscribed to %s", self.config.client_id, self.config.subscription)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason: object,
                       properties: object) -> None:
        self.metrics.connected.set(0)
        dropped = self.tracker.reset()
        self.metrics.in_flight.set(0)
        if not (self._stop.is_set() or self._closing):
            log.warning("MQTT disconnected (%s); %d unacknowledged messages will be redelivered", reason, dropped)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if self._closing:
            return  # not acknowledged: the broker redelivers it to this session (or the group) later
        self._last_message = time.monotonic()
        received_at = datetime.now(UTC)
        payload = msg.payload
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = bytes(msg._topic).decode("utf-8", errors="replace")
        try:
            verdict = validate(topic, payload, received_at, self.config.limits)
        except Exception as exc:  # a validator bug must neither crash the bridge nor lose the message
            log.exception("validator failed on a message from %s", topic)
            verdict = Verdict(rejections=[Rejection("validator_error", f"{type(exc).__name__}: {exc}"[:300])])
        metrics = self.metrics
        metrics.received.inc()
        for r in verdict.rejections:
            metrics.rejected.labels(r.reason).inc()
        records = records_for(verdict, topic, payload, received_at, self.config)
        size = sum(len(v) for _, _, v in records)
        # Bounded memory: past the byte limit, stop reading from the broker (it stops sending once Receive
        # Maximum messages are unacknowledged) until Kafka catches up; give up on Kafka failure or shutdown.
        while not self.tracker.wait_for_room(max(self.config.max_inflight_bytes - size, 0), 0.5):
            if self._kafka_failed.is_set() or self._closing or self._stop.is_set():
                return  # not acknowledged: redelivered after recovery
        samples = verdict.message["samples"] if verdict.message else []
        entry = _Pending(msg.mid, msg.qos, len(records), self.tracker.generation, len(samples),
                         sum(len(s["readings"]) for s in samples), bool(verdict.rejections), size)
        self.tracker.add(entry)
        metrics.in_flight.inc()
        done = partial(self._record_done, entry)
        failed = partial(self._kafka_failure, self._sink_epoch)
        sink = self.sink
        for topic_name, key, value in records:
            try:
                sink.send(topic_name, key, value, done, failed)  # type: ignore[union-attr]
            except (KafkaSendError, AttributeError) as exc:  # queue full for too long, or no producer right now
                failed(exc)
                return

    def _ack(self, entry: _Pending) -> None:
        if entry.qos > 0:
            self.client.ack(entry.mid, entry.qos)

    def _record_done(self, entry: _Pending) -> None:
        released = self.tracker.record_done(entry, self._ack)
        if not released:
            return
        m = self.metrics
        now = time.monotonic()
        forwarded = samples = readings = dlq = 0
        for e in released:
            m.ack_latency.observe(now - e.started)
            if e.samples:
                forwarded += 1
                samples += e.samples
                readings += e.readings
            dlq += e.dlq
        m.acked.inc(len(released))  # one increment per batch of released messages, not per message
        m.in_flight.dec(len(released))
        if forwarded:
            m.forwarded.inc(forwarded)
            m.samples.inc(samples)
            m.readings.inc(readings)
        if dlq:
            m.dead_lettered.inc(dlq)

    def _kafka_failure(self, epoch: int, exc: BaseException) -> None:
        if epoch != self._sink_epoch:
            return  # a late complaint of a producer already replaced
        if not self._kafka_failed.is_set():
            log.error("Kafka did not acknowledge a record (%s); holding acks and reconnecting for redelivery", exc)
            self.metrics.kafka_failures.inc()
        self._kafka_failed.set()

    # ------------------------------------------------------------------ run
    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.config.session_expiry_s
        props.ReceiveMaximum = min(self.config.max_inflight, 65535)
        return props

    def start(self) -> None:
        """Connect (persistent session) and start the network thread; returns at once."""
        self.client.connect_async(self.config.mqtt_host, self.config.mqtt_port, keepalive=30, clean_start=False,
                                  properties=self._connect_properties())
        self.client.loop_start()

    def run(self, install_signals: bool = True) -> None:
        """Serve until SIGTERM/SIGINT or ``stop()``; recovers from Kafka failures without losing messages."""
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self._stop.set())
        self.start()
        last_log = time.monotonic()
        backoff = 1.0
        try:
            while not self._stop.is_set():
                self._stop.wait(0.2)
                if self._kafka_failed.is_set():
                    self._recover(backoff)
                    backoff = min(backoff * 2, 15.0)
                elif len(self.tracker) == 0:
                    backoff = 1.0
                if time.monotonic() - last_log > 60:
                    log.info("bridge %s: received %d, acked %d, in flight %d", self.config.client_id,
                             self.metrics.received._value.get(), self.metrics.acked._value.get(), len(self.tracker))
                    last_log = time.monotonic()
        finally:
            self.close()

    def _recover(self, backoff: float) -> None:
        """Drop MQTT (unacknowledged messages stay with the broker), replace the producer, reconnect."""
        self.tracker.reset()  # from here on, late Kafka acks of this connection are ignored
        self.client.disconnect()
        self.client.loop_stop()
        old, self.sink = self.sink, None
        self._sink_epoch += 1  # late callbacks of the old producer are ignored from here on
        try:
            if old is not None:
                old.close(timeout=1)
        except Exception:  # closing a producer that cannot reach Kafka may complain; it is discarded anyway
            log.debug("closing the failed producer", exc_info=True)
        self.tracker.forget_bytes()
        self._kafka_failed.clear()
        if self._stop.wait(backoff):
            return
        try:
            self.sink = self._new_sink()
        except Exception as exc:  # Kafka still unreachable: try again after the next backoff
            log.warning("Kafka unreachable (%s); retrying", exc)
            self._kafka_failed.set()
            return
        log.info("reconnecting to MQTT after a Kafka failure")
        self.start()

    def retire(self, idle_s: float = 3.0, timeout_s: float = 900.0) -> bool:
        """Drain the session of a worker that no longer runs, then delete it; True when it ended cleanly.

        Mosquitto keeps giving a shared group's messages to offline members' sessions, so a worker index that
        is scaled away would otherwise sit on its share until the session expires. Retiring leaves the group,
        forwards what the session still holds (same no-loss rules) and ends the session once idle.
        """
        self._retiring = True
        self.start()
        deadline = time.monotonic() + timeout_s
        backoff = 1.0
        try:
            while time.monotonic() < deadline and not self._stop.is_set():
                self._stop.wait(0.2)
                if self._kafka_failed.is_set():
                    self._recover(backoff)
                    backoff = min(backoff * 2, 15.0)
                    continue
                quiet = time.monotonic() - self._last_message > idle_s
                if self.subscribed.is_set() and quiet and len(self.tracker) == 0:
                    break
            else:
                return False
            if self.sink is not None:
                self.sink.flush(10)
            time.sleep(0.2)
            if len(self.tracker):
                return False
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0  # the session ends with this connection
            self._closing = True
            self.client.disconnect(properties=props)
            self.client.loop_stop()
            log.info("retired %s: its session is drained and deleted", self.config.client_id)
            return True
        finally:
            self._closing = True
            if self.client.is_connected():
                self.client.disconnect()
                self.client.loop_stop()
            if self.sink is not None:
                self.sink.close(5)

    def stop(self) -> None:
        """Ask a running bridge to finish."""
        self._stop.set()

    def close(self) -> None:
        """Stop taking messages, let Kafka acknowledge what is in flight (acks go out), then leave MQTT.

        The session stays (never unsubscribe): messages published meanwhile are kept for this worker.
        """
        self._closing = True
        try:
            if self.sink is not None:
                self.sink.flush(10)
            time.sleep(0.2)  # let the network thread write the last PUBACKs
        except Exception:
            log.warning("Kafka did not take the last records; they will be redelivered", exc_info=True)
        finally:
            self.client.disconnect()
            self.client.loop_stop()
            if self.sink is not None:
                self.sink.close(5)


def end_session(config: BridgeConfig, timeout: float = 10.0) -> None:
    """Delete a worker's persistent session at the broker (its queued messages go with it).

    Only for sessions that must never come back (test workers, or a retired worker whose backlog was
    drained first by running it once more): Mosquitto round-robins a shared group over offline sessions too.
    """
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=config.client_id, protocol=mqtt.MQTTv5)
    if config.username:
        client.username_pw_set(config.username, config.password)
    if config.ca_file:
        client.tls_set(ca_certs=config.ca_file)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.connect(config.mqtt_host, config.mqtt_port, clean_start=True, properties=props)
    client.loop_start()
    try:
        connected.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()

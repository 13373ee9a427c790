"""The MQTT→Kafka bridge: validated telemetry to ``telemetry``, rejections to ``telemetry.dlq``."""

from __future__ import annotations

import base64
import json
import logging
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from kafka import KafkaProducer
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.contract import TELEMETRY_TOPIC_FILTER
from ingest.validate import Limits, Verdict, format_ts, validate

log = logging.getLogger("fleetwatch.ingest")


@dataclass(frozen=True)
class BridgeConfig:
    """Where the bridge reads from and writes to."""

    mqtt_host: str
    mqtt_port: int
    bootstrap: str
    telemetry_topic: str = "telemetry"
    dlq_topic: str = "telemetry.dlq"
    client_id: str = "fleetwatch-bridge"
    shared_group: str | None = None
    max_inflight: int = 1000
    session_expiry_s: int = 7 * 24 * 3600
    limits: Limits = field(default_factory=Limits)
    username: str | None = None
    password: str | None = None


@dataclass
class BridgeMetrics:
    """Counters the bridge keeps for status and benchmarks."""

    received: int = 0
    forwarded: int = 0
    acked: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    ack_latency_s_total: float = 0.0

    def snapshot(self) -> dict[str, Any]:
        """Plain-dict copy for logs and JSON."""
        return {"received": self.received, "forwarded": self.forwarded, "acked": self.acked,
                "rejected": dict(self.rejected), "in_flight": self.in_flight,
                "ack_latency_ms_avg": 1000 * self.ack_latency_s_total / max(self.acked, 1)}


def dlq_record(topic: str, payload: bytes, verdict: Verdict, received_at: datetime) -> list[dict[str, Any]]:
    """Dead-letter documents for every rejection in a verdict (one per rejected sample)."""
    return [
        {
            "reason": r.reason,
            "detail": r.detail,
            "mqtt_topic": topic,
            "tractor_id": verdict.tractor_id,
            "seq": verdict.seq,
            "sample_index": r.sample_index,
            "received_at": format_ts(received_at),
            "payload_b64": base64.b64encode(payload).decode(),
        }
        for r in verdict.rejections
    ]


class Bridge:
    """Subscribes at QoS 1 with a persistent session; acks MQTT only after Kafka acks."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self.metrics = BridgeMetrics()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._kafka_failed = threading.Event()
        self.producer = KafkaProducer(
            bootstrap_servers=config.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            batch_size=256 * 1024,
            compression_type=None,
            max_in_flight_requests_per_connection=5,
            delivery_timeout_ms=120_000,
            request_timeout_ms=30_000,
            max_block_ms=60_000,
        )
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=config.client_id,
                                  protocol=mqtt.MQTTv5, manual_ack=True)
        if config.username:
            self.client.username_pw_set(config.username, config.password)
        self.client.max_inflight_messages_set(config.max_inflight)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    # ------------------------------------------------------------------ MQTT
    def _subscription(self) -> str:
        if self.config.shared_group:
            return f"$share/{self.config.shared_group}/{TELEMETRY_TOPIC_FILTER}"
        return TELEMETRY_TOPIC_FILTER

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object,
                    properties: object) -> None:
        if getattr(reason, "is_failure", False):
            log.error("MQTT connect refused: %s", reason)
            return
        client.subscribe(self._subscription(), qos=1)
        log.info("bridge connected, subscribed to %s", self._subscription())

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason: object,
                       properties: object) -> None:
        if not self._stop.is_set():
            log.warning("MQTT disconnected (%s); paho reconnects and the broker redelivers unacked messages",
                        reason)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        received_at = datetime.now(UTC)
        started = time.monotonic()
        payload = bytes(msg.payload)
        verdict = validate(msg.topic, payload, received_at, self.config.limits)
        records: list[tuple[str, bytes | None, bytes]] = []
        if verdict.message is not None:
            key = verdict.tractor_id.encode()  # type: ignore[union-attr]
            records.append((self.config.telemetry_topic, key, json.dumps(verdict.message,
                                                                           separators=(",", ":")).encode()))
        for doc in dlq_record(msg.topic, payload, verdict, received_at):
            key = verdict.tractor_id.encode() if verdict.tractor_id else None
            records.append((self.config.dlq_topic, key, json.dumps(doc, separators=(",", ":")).encode()))
        with self._lock:
            self.metrics.received += 1
            self.metrics.in_flight += 1
            for r in verdict.rejections:
                self.metrics.rejected[r.reason] += 1
        pending = [len(records)]
        mid, qos = msg.mid, msg.qos

        def done(_: object = None) -> None:
            with self._lock:
                pending[0] -= 1
                if pending[0]:
                    return
                self.metrics.in_flight -= 1
                self.metrics.acked += 1
                self.metrics.forwarded += int(verdict.message is not None)
                self.metrics.ack_latency_s_total += time.monotonic() - started
            if qos > 0:
                client.ack(mid, qos)

        def failed(exc: BaseException) -> None:
            log.error("Kafka did not acknowledge a record (%s); reconnecting MQTT for redelivery", exc)
            self._kafka_failed.set()

        for topic, key, value in records:
            try:
                future = self.producer.send(topic, key=key, value=value)
            except Exception as exc:  # buffer full or Kafka unreachable for max_block_ms
                failed(exc)
                return
            future.add_callback(done).add_errback(failed)

    # ------------------------------------------------------------------ run
    def run(self) -> None:
        """Serve until SIGTERM/SIGINT; reconnects on Kafka failure so nothing unacked is lost."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.config.session_expiry_s
        props.ReceiveMaximum = min(self.config.max_inflight, 65535)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        self.client.connect(self.config.mqtt_host, self.config.mqtt_port, keepalive=30, clean_start=False,
                            properties=props)
        self.client.loop_start()
        last_log = time.monotonic()
        try:
            while not self._stop.is_set():
                self._stop.wait(0.5)
                if self._kafka_failed.is_set():
                    self._recover(props)
                if time.monotonic() - last_log > 30:
                    log.info("bridge metrics %s", self.metrics.snapshot())
                    last_log = time.monotonic()
        finally:
            self.close()

    def _recover(self, props: Properties) -> None:
        """Drop the MQTT connection (unacked messages stay with the broker) and start over."""
        self.client.disconnect()
        self.client.loop_stop()
        self.producer.flush(timeout=5)
        with self._lock:
            self.metrics.in_flight = 0
        self._kafka_failed.clear()
        time.sleep(2)
        self.client.reconnect()
        self.client.loop_start()

    def stop(self) -> None:
        """Ask a running bridge to finish."""
        self._stop.set()

    def close(self) -> None:
        """Flush Kafka (so acks go out), then leave MQTT."""
        try:
            self.producer.flush(timeout=10)
            time.sleep(0.2)
        finally:
            self.client.disconnect()
            self.client.loop_stop()
            self.producer.close(timeout=5)

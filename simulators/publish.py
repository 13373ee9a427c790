"""Publishes a simulated fleet over MQTT (QoS 1): one gateway connection, or one connection per tractor."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import paho.mqtt.client as mqtt

from ingest.contract import status_topic, telemetry_topic
from simulators.fleet import Fleet


@dataclass
class PublishResult:
    """What a run published."""

    messages: int
    samples: int
    readings: int
    seconds: float
    lag_s: float = 0.0  # real-time mode: how far the publisher fell behind the simulated clock at worst
    lag_p99_s: float = 0.0  # real-time mode: 99th percentile of the per-step lag


class Sink(Protocol):
    """Where messages go: a broker connection, many connections, or a file."""

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Send one message."""

    def drain(self, timeout: float = 120.0) -> None:
        """Wait until everything sent is acknowledged."""

    def close(self) -> None:
        """Release connections or files."""


class Gateway:
    """One MQTT connection that publishes for many tractors, waiting for every QoS 1 acknowledgement."""

    def __init__(self, host: str, port: int, client_id: str, max_inflight: int = 1000,
                 username: str | None = None, password: str | None = None, ca_file: str | None = None) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        if username:
            self.client.username_pw_set(username, password)
        if ca_file:
            self.client.tls_set(ca_certs=ca_file)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        self._acked = 0
        self._sent = 0
        self._cond = threading.Condition()
        self._answered = threading.Event()
        self._refused: str | None = None
        self.client.on_publish = self._on_publish
        self.client.on_connect = self._on_connect
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self._answered.wait(15.0) or self._refused:
            self.close()
            raise ConnectionError(self._refused or f"no CONNACK from MQTT broker {host}:{port} within 15 s")
        self.window = max_inflight * 4

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object,
                    props: object) -> None:
        if getattr(reason, "is_failure", False):
            self._refused = f"MQTT broker refused the connection: {reason}"
        self._answered.set()

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: object, props: object) -> None:
        with self._cond:
            self._acked += 1
            self._cond.notify_all()

    @property
    def acked(self) -> int:
        """Messages the broker acknowledged so far."""
        return self._acked

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Queue one QoS 1 message, blocking while too many are unacknowledged (bounded memory)."""
        with self._cond:
            while self._sent - self._acked >= self.window:
                self._cond.wait(1.0)
            self._sent += 1
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
            raise RuntimeError(f"MQTT publish failed: {mqtt.error_string(info.rc)}")

    def drain(self, timeout: float = 120.0) -> None:
        """Wait until the broker acknowledged everything published."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._acked < self._sent:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self._sent - self._acked} messages unacknowledged after {timeout}s")
                self._cond.wait(0.5)

    def close(self) -> None:
        """Disconnect cleanly."""
        self.client.disconnect()
        self.client.loop_stop()


class PerTractorConnections:
    """One MQTT connection per tractor, each logging in with that tractor's own credentials (ACL tests).

    ``credentials(tractor_id)`` returns (username, password) or None for anonymous access.
    """

    def __init__(self, host: str, port: int, client_prefix: str,
                 credentials: Callable[[str], tuple[str, str] | None] | None = None,
                 ca_file: str | None = None) -> None:
        self.host, self.port, self.prefix, self.ca_file = host, port, client_prefix, ca_file
        self.credentials = credentials
        self.gateways: dict[str, Gateway] = {}

    def _for(self, tractor_id: str) -> Gateway:
        gw = self.gateways.get(tractor_id)
        if gw is None:
            creds = self.credentials(tractor_id) if self.credentials else None
            user, password = creds if creds else (None, None)
            gw = Gateway(self.host, self.port, f"{self.prefix}-{tractor_id}", max_inflight=20,
                         username=user, password=password, ca_file=self.ca_file)
            self.gateways[tractor_id] = gw
        return gw

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish on the connection of the tractor the topic belongs to."""
        self._for(topic.split("/")[1]).publish(topic, payload, retain)

    def drain(self, timeout: float = 120.0) -> None:
        """Wait for every connection's acknowledgements."""
        for gw in self.gateways.values():
            gw.drain(timeout)

    def close(self) -> None:
        """Disconnect every tractor."""
        for gw in self.gateways.values():
            gw.close()


class FileSink:
    """Writes messages as JSON lines ``{"topic": ..., "payload": {...}}`` instead of publishing them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[bytes] = path.open("wb")

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Append one message."""
        if topic.endswith("/telemetry"):
            self._fh.write(b'{"topic":"' + topic.encode() + b'","payload":' + payload + b"}\n")

    def drain(self, timeout: float = 120.0) -> None:
        """Flush to disk."""
        self._fh.flush()

    def close(self) -> None:
        """Close the file."""
        self._fh.close()


class ListSink:
    """Keeps (topic, payload) pairs in memory (tests)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Remember one message."""
        self.messages.append((topic, payload))

    def drain(self, timeout: float = 120.0) -> None:
        """Nothing to wait for."""

    def close(self) -> None:
        """Nothing to release."""


def _count_readings(payload: bytes) -> tuple[int, int]:
    samples = payload.count(b'"ts":')
    # every JSON key ends in '":' (timestamps hold colons but never after a quote): 4 envelope keys, 3 per sample
    return samples, payload.count(b'":') - 4 - 3 * samples


def publish_steps(steps: Iterable[tuple[float, list[tuple[str, bytes]]]], sink: Sink, tractor_ids: list[str],
                  period_s: float, speed: float = 0.0,
                  progress: Callable[[float, int], None] | None = None) -> PublishResult:
    """Publish every step's messages to ``sink``; ``speed`` is simulated seconds per wall second (0 = flat out).

    Timestamps stay on the simulated clock; in real-time mode (speed 1) each step waits for its wall time.
    """
    for tid in tractor_ids:
        sink.publish(status_topic(tid), b"online", retain=True)
    started = time.monotonic()  # the simulated clock starts once every tractor announced itself
    messages = samples = readings = 0
    lags: list[float] = []
    step = 0
    for frac, msgs in steps:
        step += 1
        if speed > 0:
            due = started + step * period_s / speed
            wait = due - time.monotonic()
            lags.append(max(0.0, -wait))
            if wait > 0:
                time.sleep(wait)
        for tid, payload in msgs:
            sink.publish(telemetry_topic(tid), payload)
            s, r = _count_readings(payload)
            samples += s
            readings += r
        messages += len(msgs)
        if progress:
            progress(frac, messages)
    sink.drain()
    lags.sort()
    return PublishResult(messages, samples, readings, time.monotonic() - started, lags[-1] if lags else 0.0,
                         lags[int(0.99 * (len(lags) - 1))] if lags else 0.0)


def run_fleet(fleet: Fleet, sink: Sink, days: float, period_s: float, speed: float = 0.0,
              progress: Callable[[float, int], None] | None = None) -> PublishResult:
    """Step ``fleet`` over ``days`` every ``period_s`` simulated seconds and publish what it sends."""
    return publish_steps(fleet.run(days, period_s), sink, fleet.ids, period_s, speed, progress)


def iter_messages(fleet: Fleet, days: float, period_s: float) -> Iterator[tuple[str, bytes]]:
    """Every message of a run, in publishing order, without a broker (tests, offline evaluation)."""
    for _, msgs in fleet.run(days, period_s):
        yield from msgs

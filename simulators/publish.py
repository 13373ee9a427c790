"""Publishes a simulated fleet over MQTT (QoS 1) on an accelerated or real-time clock."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from ingest.contract import status_topic, telemetry_topic
from simulators.fleet import Fleet


@dataclass
class PublishResult:
    """What a run published."""

    messages: int
    readings: int
    seconds: float


class Gateway:
    """One MQTT connection that publishes for many tractors, waiting for every QoS 1 acknowledgement."""

    def __init__(self, host: str, port: int, client_id: str, max_inflight: int = 1000,
                 username: str | None = None, password: str | None = None) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        if username:
            self.client.username_pw_set(username, password)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        self._acked = 0
        self._sent = 0
        self._cond = threading.Condition()
        self.client.on_publish = self._on_publish
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        self.window = max_inflight * 4

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: object, props: object) -> None:
        with self._cond:
            self._acked += 1
            self._cond.notify_all()

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


def run_fleet(fleet: Fleet, gateway: Gateway, days: float, period_s: float, speed: float = 0.0,
              progress: Callable[[float, int], None] | None = None) -> PublishResult:
    """Step the fleet from 0 to ``days`` every ``period_s`` simulated seconds and publish each sample.

    ``speed`` is simulated seconds per wall second; 0 means as fast as the broker accepts.
    """
    started = time.monotonic()
    for tid in fleet.ids:
        gateway.publish(status_topic(tid), b"online", retain=True)
    steps = int(days * 86_400 / period_s)
    messages = readings = 0
    for step in range(1, steps + 1):
        t = step * period_s
        if speed > 0:
            wait = started + t / speed - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        for tid, msg in fleet.messages(t, period_s):
            gateway.publish(telemetry_topic(tid), json.dumps(msg, separators=(",", ":")).encode())
            messages += 1
            readings += len(msg["samples"][0]["readings"])
        if progress:
            progress(step / steps, messages)
    gateway.drain()
    return PublishResult(messages, readings, time.monotonic() - started)

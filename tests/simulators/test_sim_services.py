"""The simulator against the real Mosquitto: gateway mode and per-tractor connections with their own credentials."""

from __future__ import annotations

import threading
import time
from collections import Counter

import paho.mqtt.client as mqtt
import pytest

from fleetwatch.cli_sim import Mode, run_simulation
from fleetwatch.credentials import mqtt_endpoint, service_credentials, tractor_credentials
from fleetwatch.settings import Settings
from simulators.publish import Gateway

pytestmark = pytest.mark.services


class Listener:
    """Counts telemetry per topic as the broker delivers it (logged in as the bridge service user)."""

    def __init__(self, s: Settings) -> None:
        host, port, ca = mqtt_endpoint(s)
        user, password = service_credentials(s, "bridge")
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sim-test-{time.time_ns()}",
                                  protocol=mqtt.MQTTv311)
        self.client.username_pw_set(user, password)
        if ca:
            self.client.tls_set(ca_certs=ca)
        self.client.on_connect = lambda c, *_: c.subscribe("tractors/+/telemetry", qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        assert subscribed.wait(20), "listener could not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.counts[msg.topic] += 1

    def wait_for(self, total: int, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and sum(self.counts.values()) < total:
            time.sleep(0.2)
        time.sleep(0.5)  # anything beyond the expected count would show up now
        return sum(self.counts.values())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("mode", [Mode.gateway, Mode.per_tractor])
def test_every_published_message_reaches_the_broker(services: Settings, mode: Mode) -> None:
    listener = Listener(services)
    try:
        published, truth = run_simulation(services, "sensor-faults", 4, 1.5, 5, 1800.0, None, 0.0, None,
                                          mode=mode, quiet=True)
        assert published == truth["messages"] > 0
        assert listener.wait_for(published) == published
        assert {t.split("/")[1] for t in listener.counts} <= set(truth["tractors"])
    finally:
        listener.close()


def test_a_tractor_connection_cannot_publish_for_another_tractor(services: Settings) -> None:
    host, port, ca = mqtt_endpoint(services)
    user, password = tractor_credentials(services, "T00001")
    listener = Listener(services)
    gw = Gateway(host, port, f"sim-test-acl-{time.time_ns()}", username=user, password=password, ca_file=ca)
    try:
        gw.publish("tractors/T00002/telemetry", b'{"v":1}')
        gw.publish("tractors/T00001/telemetry", b'{"v":1}')
        gw.drain(20)
        listener.wait_for(1, timeout=10)
        assert dict(listener.counts) == {"tractors/T00001/telemetry": 1}
    finally:
        gw.close()
        listener.close()

"""Bridge pieces without brokers: in-order acks, dead-letter documents, device passwords, metrics summary."""

from __future__ import annotations

import json
import random
import socket
import stat
import struct
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.bridge import AckTracker, BridgeConfig, BufferedClient, LeanProperties, _Pending, records_for
from ingest.deadletter import dead_letter, describe, original_payload
from ingest.devices import DeviceError, DeviceRegistry, hash_password, verify_password
from ingest.metrics import BridgeMetrics, MetricsSummary
from ingest.validate import validate

NOW = datetime(2026, 11, 27, 13, 0, tzinfo=UTC)


def pending(mid: int, tracker: AckTracker, parts: int = 1) -> _Pending:
    entry = _Pending(mid, 1, parts, tracker.generation, 1, 12, False, 100)
    tracker.add(entry)
    return entry


def test_acks_leave_in_arrival_order_even_when_kafka_answers_out_of_order() -> None:
    tracker, acked = AckTracker(), []
    a, b, c = pending(1, tracker), pending(2, tracker, parts=2), pending(3, tracker)
    tracker.record_done(c, lambda e: acked.append(e.mid))
    tracker.record_done(b, lambda e: acked.append(e.mid))
    assert acked == []  # message 1 is not acknowledged by Kafka yet: nothing after it may be acked
    tracker.record_done(a, lambda e: acked.append(e.mid))
    assert acked == [1]  # message 2 still waits for its second record (its DLQ document)
    tracker.record_done(b, lambda e: acked.append(e.mid))
    assert acked == [1, 2, 3]
    assert tracker.bytes == 0


def test_acks_owed_to_a_lost_connection_are_never_sent() -> None:
    tracker, acked = AckTracker(), []
    old = pending(5, tracker)
    assert tracker.reset() == 1  # MQTT reconnected: the broker redelivers message 5 under a fresh packet id
    fresh = pending(5, tracker)
    tracker.record_done(old, lambda e: acked.append(("old", e.mid)))
    tracker.record_done(fresh, lambda e: acked.append(("new", e.mid)))
    assert acked == [("new", 5)]


def test_a_failed_record_holds_back_every_later_ack() -> None:
    tracker, acked = AckTracker(), []
    pending(1, tracker)  # Kafka never acknowledges this one
    for mid in range(2, 50):
        tracker.record_done(pending(mid, tracker), lambda e: acked.append(e.mid))
    assert acked == [] and len(tracker) == 49


def test_room_is_bounded_by_unacknowledged_bytes() -> None:
    tracker = AckTracker()
    entry = pending(1, tracker)
    assert not tracker.wait_for_room(50, timeout=0.01)
    tracker.record_done(entry, lambda e: None)
    assert tracker.wait_for_room(50, timeout=0.01)


def test_partly_valid_message_yields_telemetry_and_one_dead_letter() -> None:
    payload = json.dumps({"v": 1, "tractor_id": "T00001", "seq": 3, "samples": [
        {"ts": "2026-11-27T12:00:00Z", "engine_hours": 10, "readings": {"battery_v": 13.9}},
        {"ts": "2026-11-27T12:10:00Z", "engine_hours": 10, "readings": {"battery_v": 99}}]}).encode()
    topic = "tractors/T00001/telemetry"
    verdict = validate(topic, payload, NOW)
    records = records_for(verdict, topic, payload, NOW, BridgeConfig("h", 1, "b"))
    assert [(t, k) for t, k, _ in records] == [("telemetry", b"T00001"), ("telemetry.dlq", b"T00001")]
    doc = json.loads(records[1][2])
    assert doc["reason"] == "reading_out_of_range" and doc["rejected_samples"] == 1 and doc["accepted_samples"] == 1
    assert original_payload(doc) == payload and doc["mqtt_topic"] == topic
    assert doc["received_at"] == "2026-11-27T13:00:00.000Z"
    assert "reading_out_of_range" in describe(doc) and "T00001" in describe(doc)


def test_huge_dead_letter_keeps_a_truncated_copy_and_its_digest() -> None:
    payload = b"{" * 700_000
    verdict = validate("tractors/T1/telemetry", payload, NOW)
    doc = dead_letter("tractors/T1/telemetry", payload, verdict, NOW)
    assert doc["reason"] == "payload_too_large" and doc["payload_truncated"] and doc["payload_bytes"] == 700_000
    assert len(json.dumps(doc)) < 1_000_000  # fits a default Kafka record


def test_device_passwords_are_hashed_mosquitto_style(tmp_path: Path) -> None:
    reg = DeviceRegistry(tmp_path)
    password = reg.add_tractor("T00042")
    text = (tmp_path / "passwd").read_text()
    assert password not in text and text.startswith("T00042:$7$")
    assert stat.S_IMODE((tmp_path / "passwd").stat().st_mode) == 0o600
    assert reg.check("T00042", password) and not reg.check("T00042", password + "x")
    with pytest.raises(DeviceError):
        reg.add_tractor("T00042")
    with pytest.raises(DeviceError):
        reg.add_tractor("T0/#")
    reg.revoke("T00042")
    assert not reg.check("T00042", password)
    assert [(d.username, d.active) for d in reg.list()] == [("T00042", False)]


@pytest.mark.services  # needs Debian's mosquitto package (mosquitto_passwd), like the service tests
def test_hash_matches_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    passwd = tmp_path / "p"
    passwd.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "u", "s3cret-pw"], check=True)
    hashed = passwd.read_text().strip().split(":", 1)[1]
    assert verify_password("s3cret-pw", hashed) and not verify_password("other", hashed)
    assert verify_password("pw", hash_password("pw"))


def test_metrics_text_is_summarised_for_status() -> None:
    from prometheus_client import generate_latest

    m = BridgeMetrics("w0")
    m.received.inc(5)
    m.forwarded.inc(4)
    m.rejected.labels("bad_json").inc()
    m.ack_latency.observe(0.02)
    summary = MetricsSummary()
    summary.add(generate_latest(m.registry).decode())
    summary.add(generate_latest(m.registry).decode())
    assert (summary.workers, summary.received, summary.forwarded) == (2, 10, 8)
    assert summary.rejected == {"bad_json": 2} and summary.ack_latency_ms == pytest.approx(20)


# ---------------------------------------------------------------- paho speed-ups change nothing paho delivers
def _vbi(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (128 if n else 0))
        if not n:
            return bytes(out)


def _publish(mid: int, topic: bytes, payload: bytes, props: bytes = b"\x00") -> bytes:
    """A QoS 1 PUBLISH as a broker sends it (``props``: packed properties, with their length)."""
    body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", mid) + props + payload
    return bytes([0x32]) + _vbi(len(body)) + body


def _props(**values: object) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(props, name, value)
    return props


def test_buffered_client_delivers_every_packet_however_the_stream_is_split() -> None:
    client = BufferedClient(mqtt.CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv5, manual_ack=True)
    got: list[tuple[int, str, bytes, list[object]]] = []
    client.on_message = lambda _c, _u, m: got.append((m.mid, m.topic, m.payload,
                                                      getattr(m.properties, "UserProperty", [])))
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client._sock = ours  # the network loop's socket; no broker needed to feed it packets
    rng = random.Random(7)
    sizes = [rng.choice([0, 1, 127, 128, 411, 16_383, 16_384, 70_000]) for _ in range(300)]
    user = _props(UserProperty=[("k", "v")]).pack()
    expected = [(i, f"tractors/T{i:05d}/telemetry", bytes([i % 251]) * n, [("k", "v")] if i % 7 == 0 else [])
                for i, n in enumerate(sizes, start=1)]
    stream = b"".join(_publish(mid, topic.encode(), payload, user if props else b"\x00")
                      for mid, topic, payload, props in expected)
    pos = 0
    try:
        while pos < len(stream):
            step = rng.choice([1, 2, 3, 50, 4096, 65_536, 200_000])
            theirs.sendall(stream[pos:pos + step])
            pos += step
            assert client.loop_read() == mqtt.MQTT_ERR_SUCCESS
    finally:
        ours.close()
        theirs.close()
    assert got == expected


def test_lean_properties_decode_like_paho() -> None:
    packed = _props(UserProperty=[("a", "1"), ("b", "2")], MessageExpiryInterval=60, ContentType="json",
                    SubscriptionIdentifier=[3], PayloadFormatIndicator=1).pack()
    theirs, _ = Properties(PacketTypes.PUBLISH).unpack(packed)
    ours, _ = LeanProperties(PacketTypes.PUBLISH).unpack(packed)
    assert ours.json() == theirs.json() and ours.json()["UserProperty"] == [("a", "1"), ("b", "2")]
    assert LeanProperties(PacketTypes.PUBLISH).unpack(_vbi(0))[0].json() == {}

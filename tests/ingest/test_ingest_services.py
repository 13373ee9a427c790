"""The bridge against real Mosquitto and Kafka: kill -9, Kafka outage, hostile payloads, ACLs, two workers."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from kafka import KafkaConsumer, TopicPartition

from fleetwatch.cli_ingest import bridge_config
from fleetwatch.credentials import service_credentials
from fleetwatch.pipeline import ensure_topics
from fleetwatch.settings import Settings
from fleetwatch.stack import Stack, port_open
from ingest.bridge import end_session
from ingest.contract import SIGNALS
from ingest.metrics import scrape
from ingest.validate import format_ts

pytestmark = pytest.mark.services
FLEETWATCH = str(Path(sys.executable).with_name("fleetwatch"))
READINGS = [s for s in SIGNALS if s != "dpf_soot_pct"]  # 12 readings, like the benchmark


def good(tractor: str, seq: int, when: datetime | None = None) -> bytes:
    ts = format_ts(when or datetime.now(UTC))
    return json.dumps({"v": 1, "tractor_id": tractor, "seq": seq, "samples": [
        {"ts": ts, "engine_hours": 1000 + seq / 10, "readings": {s: round((SIGNALS[s].low + SIGNALS[s].high) / 3, 2)
                                                               for s in READINGS}}]}).encode()


class Publisher:
    """A QoS 1 MQTT v5 publisher that remembers each PUBACK's reason code."""

    def __init__(self, s: Settings, username: str | None, password: str | None, client_id: str) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username:
            self.client.username_pw_set(username, password)
        self.client.max_inflight_messages_set(500)
        self.reasons: dict[int, str] = {}
        self.client.on_publish = lambda c, u, mid, rc, p: self.reasons.__setitem__(mid, str(rc))
        self.connack: list[str] = []
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.append(str(rc))
        self.infos: list[mqtt.MQTTMessageInfo] = []
        self.client.connect(s.mqtt_host, s.mqtt_port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=1)
        self.infos.append(info)
        return info

    def wait(self, timeout: float = 60) -> None:
        for info in self.infos:
            info.wait_for_publish(timeout)

    def close(self) -> None:
        self.wait()
        self.client.disconnect()
        self.client.loop_stop()


def simulator(s: Settings, name: str) -> Publisher:
    user, password = service_credentials(s, "simulator")
    return Publisher(s, user, password, f"test-{name}-{time.time_ns()}")


def read_topic(s: Settings, topic: str) -> list[bytes]:
    """Every record value currently in a topic (all partitions)."""
    consumer = KafkaConsumer(bootstrap_servers=s.bootstrap, enable_auto_commit=False)
    try:
        deadline = time.monotonic() + 15
        while not (parts := consumer.partitions_for_topic(topic)) and time.monotonic() < deadline:
            time.sleep(0.2)  # metadata of a just-created topic may lag
        tps = [TopicPartition(topic, p) for p in sorted(parts or ())]
        assert tps, f"topic {topic} has no partitions"
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        values: list[bytes] = []
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            for records in consumer.poll(timeout_ms=500).values():
                values += [r.value for r in records]
        return values
    finally:
        consumer.close()


def keys_in(s: Settings) -> Counter[tuple[str, int]]:
    """How often each (tractor_id, seq) is in the telemetry topic."""
    return Counter((d["tractor_id"], d["seq"]) for d in map(json.loads, read_topic(s, s.topic("telemetry"))))


def wait_for_keys(s: Settings, expected: set[tuple[str, int]], timeout: float) -> Counter[tuple[str, int]]:
    deadline = time.monotonic() + timeout
    while True:
        found = keys_in(s)
        if expected <= set(found) or time.monotonic() > deadline:
            return found
        time.sleep(1)


class Bridge:
    """``fleetwatch ingest run`` as a child process of the test."""

    def __init__(self, s: Settings, workers: int = 1) -> None:
        self.s, self.workers = s, workers
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        log = self.s.run_dir / "logs" / f"test-bridge-{self.s.topic_prefix}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen([FLEETWATCH, "ingest", "run", "--workers", str(self.workers)],
                                    env=os.environ.copy(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30  # the metrics endpoints open once each worker is subscribed
        while not all(port_open(self.s.mqtt_host, self.s.ingest_metrics_base + i) for i in range(self.workers)):
            assert proc.poll() is None and time.monotonic() < deadline, "bridge did not subscribe"
            time.sleep(0.2)
        return proc

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def restart(self) -> None:
        self.proc = self._start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture()
def ingest(isolated: Settings) -> Iterator[Settings]:
    """Topics of a fresh prefix; afterwards the test's bridge sessions are deleted at the broker."""
    ensure_topics(isolated)
    yield isolated
    for i in range(2):
        end_session(bridge_config(isolated, i))


@pytest.fixture()
def bridge(ingest: Settings) -> Iterator[Bridge]:
    b = Bridge(ingest)
    yield b
    b.stop()


def test_kill_9_mid_stream_loses_nothing(ingest: Settings, bridge: Bridge) -> None:
    pub = simulator(ingest, "kill9")
    published = {(f"K{t:05d}", seq) for t in range(20) for seq in range(1, 151)}
    now = datetime.now(UTC)

    def publish() -> None:
        for seq in range(1, 151):
            for t in range(20):
                pub.send(f"tractors/K{t:05d}/telemetry", good(f"K{t:05d}", seq, now))
            time.sleep(0.01)

    thread = threading.Thread(target=publish)
    thread.start()
    time.sleep(0.6)
    bridge.kill9()  # while messages are in flight between Mosquitto, the bridge and Kafka
    time.sleep(0.5)
    bridge.restart()
    thread.join()
    pub.close()
    time.sleep(1)
    # the restarted bridge took over the rest of the stream
    assert scrape(ingest.mqtt_host, ingest.ingest_metrics_base, max_workers=1, timeout=10).received > 0
    found = wait_for_keys(ingest, published, timeout=60)
    assert published - set(found) == set(), f"{len(published - set(found))} messages lost"
    assert set(found) == published  # nothing invented; duplicates (redelivered) are allowed


def test_kafka_down_for_30_s_loses_nothing(ingest: Settings, bridge: Bridge) -> None:
    stack = Stack(ingest)
    pub = simulator(ingest, "outage")
    published = {(f"O{t:05d}", seq) for t in range(10) for seq in range(1, 121)}

    def publish() -> None:
        for seq in range(1, 121):
            for t in range(10):
                pub.send(f"tractors/O{t:05d}/telemetry", good(f"O{t:05d}", seq))
            time.sleep(0.3)  # ~36 s of publishing, most of it while Kafka is down

    thread = threading.Thread(target=publish)
    thread.start()
    time.sleep(3)
    stack.stop(["kafka"])
    try:
        time.sleep(25)
        held = scrape(ingest.mqtt_host, ingest.ingest_metrics_base, max_workers=1, timeout=10)
        time.sleep(5)
    finally:
        stack.start(["kafka"])
    # back-pressure: messages waited unacknowledged, bounded by Receive Maximum
    assert held.workers == 1 and 0 < held.in_flight <= ingest.ingest_max_inflight
    thread.join()
    pub.close()
    found = wait_for_keys(ingest, published, timeout=120)
    assert published - set(found) == set(), f"{len(published - set(found))} messages lost"
    m = scrape(ingest.mqtt_host, ingest.ingest_metrics_base, max_workers=1, timeout=10)
    assert m.in_flight == 0 and m.received >= len(published)


HOUR_AGO = format_ts(datetime.now(UTC) - timedelta(hours=1))


def doc(tractor: str = "T00001", seq: int = 1, **sample: object) -> dict[str, object]:
    return {"v": 1, "tractor_id": tractor, "seq": seq,
            "samples": [{"ts": HOUR_AGO, "engine_hours": 5.0, "readings": {"battery_v": 13.8}, **sample}]}


def raw(d: object) -> bytes:
    return json.dumps(d).encode()


T1 = "tractors/T00001/telemetry"
# (topic, payload, reason the DLQ must give)
HOSTILE: list[tuple[str, bytes, str]] = [
    (T1, b'{"v":1,"tractor_id":', "bad_json"),
    (T1, b"", "empty_payload"),
    (T1, b" \t\r\n ", "empty_payload"),
    (T1, b"\xc3\x28\xa0\xa1 not utf-8", "bad_json"),
    (T1, b"\xef\xbb\xbf" + raw(doc()), "bad_json"),  # UTF-8 byte order mark
    (T1, b"[" * 50_000 + b"]" * 50_000, "bad_json"),  # nesting bomb
    (T1, b'{"v":1,"tractor_id":"T00001","seq":' + b"7" * 6000 + b"}", "bad_json"),  # integer bomb
    (T1, b"[]", "not_an_object"),
    (T1, b'"hello"', "not_an_object"),
    (T1, b"null", "not_an_object"),
    (T1, raw({**doc(), "v": 2}), "unsupported_version"),
    (T1, raw({**doc(), "v": "1"}), "unsupported_version"),
    (T1, raw(doc(tractor="T00002")), "tractor_mismatch"),
    (T1, raw(doc(tractor="T00001'; DROP TABLE orders;--")), "bad_tractor_id"),
    (T1, raw(doc(tractor="T0000\u00b9")), "bad_tractor_id"),
    (T1, raw(doc(tractor="🚜")), "bad_tractor_id"),
    (T1, raw(doc(tractor="T+/#")), "bad_tractor_id"),
    (T1, raw(doc(tractor="T\u0000")), "bad_tractor_id"),
    (T1, raw(doc(tractor="T" * 33)), "bad_tractor_id"),
    ("tractors/Tünïcødé/telemetry", raw(doc(tractor="Tünïcødé")), "bad_topic"),
    ("tractors/" + "T" * 40 + "/telemetry", raw(doc(tractor="T" * 40)), "bad_topic"),
    ("tractors/' OR 1=1 --/telemetry", raw(doc()), "bad_topic"),
    (T1, raw(doc(seq=-1)), "bad_seq"),
    (T1, raw(doc(seq="12")), "bad_seq"),
    (T1, raw(doc(seq=1.5)), "bad_seq"),
    (T1, raw({"v": 1, "tractor_id": "T00001", "seq": 1}), "bad_samples"),
    (T1, raw({"v": 1, "tractor_id": "T00001", "seq": 1, "samples": []}), "bad_samples"),
    (T1, raw({"v": 1, "tractor_id": "T00001", "seq": 1, "samples": "lots"}), "bad_samples"),
    (T1, raw({"v": 1, "tractor_id": "T00001", "seq": 1, "samples": [7]}), "sample_not_object"),
    (T1, raw(doc()).replace(b"13.8", b"NaN"), "non_finite_reading"),
    (T1, raw(doc()).replace(b"13.8", b"-Infinity"), "non_finite_reading"),
    (T1, raw(doc()).replace(b"13.8", b"1e999"), "non_finite_reading"),
    (T1, raw(doc(readings={"battery_v": "13.8"})), "bad_reading_type"),
    (T1, raw(doc(readings={"battery_v": 230.0})), "reading_out_of_range"),
    (T1, raw(doc(readings={"flux_capacitor": 1.21})), "unknown_signal"),
    (T1, raw(doc(readings={})), "bad_readings"),
    (T1, raw(doc(ts="last tuesday")), "bad_timestamp"),
    (T1, raw(doc(ts=format_ts(datetime.now(UTC) + timedelta(days=1)))), "timestamp_in_future"),
    (T1, raw(doc(ts="2001-01-01T00:00:00.000Z")), "timestamp_too_old"),
    (T1, raw(doc(engine_hours=-3)), "bad_engine_hours"),
    (T1, b'{"pad":"' + b"x" * 300_000 + b'"}', "payload_too_large"),
    (T1, raw({"v": 1, "tractor_id": "T00001", "seq": 1, "samples": [{}] * 2001}), "too_many_samples"),
]


def test_hostile_payloads_each_land_in_the_dlq_with_their_reason(ingest: Settings, bridge: Bridge) -> None:
    pub = simulator(ingest, "hostile")
    now = datetime.now(UTC)
    good_keys: set[tuple[str, int]] = set()
    seq = 0
    for topic, payload, _ in HOSTILE:
        seq += 1
        pub.send(f"tractors/G{seq % 3:05d}/telemetry", good(f"G{seq % 3:05d}", seq, now))
        good_keys.add((f"G{seq % 3:05d}", seq))
        pub.send(topic, payload)
    # a store-and-forward batch with one bad sample: the good samples are forwarded, the bad one dead-lettered
    mixed = raw({"v": 1, "tractor_id": "T00001", "seq": 99, "samples": [
        {"ts": HOUR_AGO, "engine_hours": 5.0, "readings": {"battery_v": 13.8}},
        {"ts": HOUR_AGO, "engine_hours": 5.0, "readings": {"battery_v": -40.0}},
        {"ts": HOUR_AGO, "engine_hours": 5.1, "readings": {"battery_v": 13.7}}]})
    pub.send(T1, mixed)
    pub.close()
    assert set(pub.reasons.values()) == {"Success"}  # the broker took every one of them

    expected = {(t, p): r for t, p, r in HOSTILE}
    expected[(T1, mixed)] = "reading_out_of_range"
    deadline = time.monotonic() + 60
    while True:
        dead = [json.loads(v) for v in read_topic(ingest, ingest.topic("telemetry.dlq"))]
        if len(dead) >= len(expected) or time.monotonic() > deadline:
            break
        time.sleep(1)
    got = {}
    for d in dead:
        original = base64.b64decode(d["payload_b64"])
        key = next(k for k in expected if k[0] == d["mqtt_topic"]
                   and (k[1][:len(original)] == original if d["payload_truncated"] else k[1] == original))
        got[key] = d["reason"]
        assert d["received_at"] and d["detail"] and d["payload_bytes"] == len(key[1])
    assert {k[1][:60] for k in expected} - {k[1][:60] for k in got} == set()
    assert len(dead) == len(expected) == len(got)
    assert got == expected

    telemetry = [json.loads(v) for v in read_topic(ingest, ingest.topic("telemetry"))]
    found = Counter((m["tractor_id"], m["seq"]) for m in telemetry)
    assert set(found) == good_keys | {("T00001", 99)}  # all good traffic flowed, no bad message got through
    forwarded_mixed = next(m for m in telemetry if m["seq"] == 99)
    assert [s["readings"]["battery_v"] for s in forwarded_mixed["samples"]] == [13.8, 13.7]

    tail = subprocess.run([FLEETWATCH, "ingest", "dlq", "--last", "100"], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=60)
    assert tail.returncode == 0 and tail.stdout.count("\n") >= len(expected)
    assert "tractor_mismatch" in tail.stdout and "bad_topic" in tail.stdout


def test_a_tractor_cannot_speak_for_another_and_anonymous_is_refused(ingest: Settings, bridge: Bridge) -> None:
    env = os.environ.copy()
    passwords = {}
    for tid in ("A00001", "A00002"):
        subprocess.run([FLEETWATCH, "devices", "revoke", tid], env=env, capture_output=True)  # rerun-safe
        added = subprocess.run([FLEETWATCH, "devices", "add", tid], env=env, capture_output=True, text=True)
        assert added.returncode == 0, added.stderr
        passwords[tid] = added.stdout.strip()
    listed = subprocess.run([FLEETWATCH, "devices", "list", "--json"], env=env, capture_output=True, text=True)
    assert all(p not in listed.stdout for p in passwords.values())
    time.sleep(0.5)  # Mosquitto re-reads the password file on SIGHUP

    a1 = Publisher(ingest, "A00001", passwords["A00001"], "A00001")
    own = a1.send("tractors/A00001/telemetry", good("A00001", 1))
    foreign = a1.send("tractors/A00002/telemetry", good("A00002", 1))
    a1.close()
    assert a1.connack == ["Success"]
    assert a1.reasons[own.mid] == "Success" and a1.reasons[foreign.mid] == "Not authorized"

    for user, password in ((None, None), ("A00002", "wrong-password"), ("svc.bridge", "guess")):
        p = Publisher(ingest, user, password, f"intruder-{time.time_ns()}")
        time.sleep(0.5)
        assert p.connack and p.connack[0] in ("Not authorized", "Bad user name or password")
        p.client.loop_stop()

    found = wait_for_keys(ingest, {("A00001", 1)}, timeout=30)
    assert ("A00001", 1) in found and ("A00002", 1) not in found

    revoked = subprocess.run([FLEETWATCH, "devices", "revoke", "A00001"], env=env, capture_output=True, text=True)
    assert revoked.returncode == 0
    time.sleep(0.5)
    again = Publisher(ingest, "A00001", passwords["A00001"], f"A00001-{time.time_ns()}")
    time.sleep(0.5)
    assert again.connack and again.connack[0] != "Success"
    again.client.loop_stop()


def test_two_workers_split_the_load_with_nothing_lost_or_doubled(ingest: Settings) -> None:
    workers = Bridge(ingest, workers=2)
    try:
        pub = simulator(ingest, "split")
        now = datetime.now(UTC)
        published = {(f"S{t:05d}", seq) for t in range(40) for seq in range(1, 51)}
        for seq in range(1, 51):
            for t in range(40):
                pub.send(f"tractors/S{t:05d}/telemetry", good(f"S{t:05d}", seq, now))
        pub.close()
        found = wait_for_keys(ingest, published, timeout=60)
        time.sleep(1)
        found = keys_in(ingest)
        assert set(found) == published
        assert max(found.values()) == 1  # no redelivery happened, so nothing may be doubled
        per_worker = [scrape(ingest.mqtt_host, ingest.ingest_metrics_base + i, max_workers=1, timeout=10)
                      for i in range(2)]
        forwarded = [m.forwarded for m in per_worker]
        assert sum(forwarded) == len(published) and min(forwarded) > len(published) / 4, forwarded
    finally:
        workers.stop()


def test_scaling_down_drains_the_retired_workers_share(ingest: Settings) -> None:
    Bridge(ingest, workers=2).stop()  # two sessions in the shared group, both offline now
    pub = simulator(ingest, "scale-down")
    now = datetime.now(UTC)
    offline = {(f"D{t:05d}", seq) for t in range(20) for seq in range(1, 11)}
    for tid, seq in sorted(offline):
        pub.send(f"tractors/{tid}/telemetry", good(tid, seq, now))  # Mosquitto splits them over both sessions
    pub.wait()
    one = Bridge(ingest, workers=1)  # drains worker 1's session before worker 0 starts, then deletes it
    try:
        later = {(f"D{t:05d}", seq) for t in range(20) for seq in range(11, 16)}
        for tid, seq in sorted(later):
            pub.send(f"tractors/{tid}/telemetry", good(tid, seq, now))
        pub.close()
        found = wait_for_keys(ingest, offline | later, timeout=60)
        # nothing stranded in the retired session, and no later message was dealt to it
        assert (offline | later) - set(found) == set()
    finally:
        one.stop()

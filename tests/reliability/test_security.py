"""Security of the running system: MQTT identities and ACLs, TLS, API tokens and roles, hostile ids, no leaked secrets.

One module stack: our own Mosquitto with a TLS listener, the bridge connected over TLS and the API process, on
the session's Kafka and PostgreSQL. Negative MQTT checks never rely on a timeout: each denied message is
followed on the same path by an allowed one, and the test waits for that one (MQTT keeps per-client order).
"""

from __future__ import annotations

import json
import ssl
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from kafka import KafkaConsumer, TopicPartition

from fleetwatch.credentials import certs_dir, service_credentials, tractor_credentials
from fleetwatch.db import upgrade
from fleetwatch.pipeline import ensure_topics
from fleetwatch.settings import Settings
from fleetwatch.stack import Stack

pytestmark = pytest.mark.services
SECRETS: list[str] = []  # API tokens created by these tests, checked against every log at the end


@pytest.fixture(scope="module")
def secure(services: Settings) -> Iterator[Settings]:
    """Mosquitto (plain + TLS listener), bridge over TLS and API on their own run folder and ports."""
    import psycopg

    name = f"sec_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"host=127.0.0.1 port={services.pg_port} user={services.pg_user} dbname=postgres",
                         autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    env = {
        "FLEETWATCH_RUN_DIR": str(services.run_dir / "security"),
        "FLEETWATCH_MQTT_PORT": str(services.mqtt_port + 500),
        "FLEETWATCH_MQTT_TLS_PORT": str(services.mqtt_port + 501),
        "FLEETWATCH_MQTT_TLS": "true",
        "FLEETWATCH_API_PORT": str(services.api_port + 500),
        "FLEETWATCH_INGEST_METRICS_PORT": str(services.mqtt_port + 502),
        "FLEETWATCH_TOPIC_PREFIX": f"sec{uuid.uuid4().hex[:6]}-",
        "FLEETWATCH_DATABASE_URL": f"postgresql+psycopg://{services.pg_user}@127.0.0.1:{services.pg_port}/{name}",
        "FLEETWATCH_MQTT_SESSION_EXPIRY_S": "300",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        s = Settings()
        upgrade(s.db_url)
        ensure_topics(s)
        stack = Stack(s)
        stack.down()
        stack.start(["mosquitto", "bridge", "api"])
        try:
            yield s
        finally:
            stack.down()


# ------------------------------------------------------------------ MQTT helpers
class Peer:
    """One MQTT v5 client that remembers what it received."""

    def __init__(self, s: Settings, user: str | None, password: str | None, tls: bool = False,
                 ca: str | None = None) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sec-{uuid.uuid4().hex[:10]}",
                                  protocol=mqtt.MQTTv5)
        if user:
            self.client.username_pw_set(user, password)
        if tls:
            self.client.tls_set(ca_certs=ca)
        self.connected = threading.Event()
        self.reason: Any = None
        self.granted: dict[int, list[Any]] = {}
        self.acked = threading.Event()
        self.received: list[tuple[str, bytes]] = []
        self.got = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda c, u, mid, codes, p: (self.granted.__setitem__(mid, codes), self.acked.set())
        self.client.on_message = self._on_message
        self.client.connect(s.mqtt_host, s.mqtt_tls_port if tls else s.mqtt_port, keepalive=30)
        self.client.loop_start()
        self.connected.wait(10)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.reason = reason
        self.connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.got:
            self.received.append((msg.topic, msg.payload))
            self.got.notify_all()

    @property
    def accepted(self) -> bool:
        return self.reason is not None and not self.reason.is_failure

    def subscribe(self, topic: str) -> bool:
        """True when the broker granted the subscription."""
        self.acked.clear()
        _, mid = self.client.subscribe(topic, qos=1)
        assert self.acked.wait(10), f"no SUBACK for {topic}"
        return not any(code.is_failure for code in self.granted[mid])

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def offend(self, topic: str, payload: bytes) -> str:
        """Publish where this identity may not; returns what the broker answered (then this peer is closed)."""
        answer: list[str] = []
        self.client.on_publish = lambda c, u, mid, reason, props: answer.append(str(reason))
        gone = threading.Event()
        self.client.on_disconnect = lambda *args: gone.set()
        self.client.publish(topic, payload, qos=1)
        gone.wait(10)  # Mosquitto 2 answers "Not authorized" and drops the connection
        self.close()
        return ",".join(answer) + (" + disconnected" if gone.is_set() else "")

    def wait_for(self, payload: bytes, timeout: float = 15.0) -> None:
        with self.got:
            assert self.got.wait_for(lambda: any(p == payload for _, p in self.received), timeout), \
                f"{payload!r} never arrived"

    def payloads(self) -> set[bytes]:
        with self.got:
            return {p for _, p in self.received}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _marker(label: str) -> bytes:
    return f"{label}-{uuid.uuid4().hex}".encode()


def test_anonymous_and_wrong_passwords_are_refused(secure: Settings) -> None:
    bridge_user, _ = service_credentials(secure, "bridge")
    for user, password in ((None, None), (bridge_user, "not-the-password"), ("T99999", "x" * 32),
                           ("svc.admin", "guess-guess-guess")):
        peer = Peer(secure, user, password)
        try:
            assert peer.reason is not None and peer.reason.is_failure, f"{user!r} was let in"
        finally:
            peer.close()


def test_a_tractor_publishes_and_subscribes_only_inside_its_own_tree(secure: Settings) -> None:
    a_user, a_pass = tractor_credentials(secure, "TSECA1")
    tractor_credentials(secure, "TSECB1")
    watcher = Peer(secure, *service_credentials(secure, "simulator"))
    a = Peer(secure, a_user, a_pass)
    try:
        assert watcher.accepted and a.accepted
        assert watcher.subscribe("tractors/#")
        # Mosquitto 2.0 grants these SUBACKs but its ACL delivers nothing outside A's tree (checked below).
        for outside in ("tractors/TSECB1/telemetry", "tractors/#", "$share/x/tractors/+/telemetry", "#"):
            a.subscribe(outside)
        assert a.subscribe("tractors/TSECA1/#")

        foreign, mine = _marker("foreign"), _marker("mine")
        watcher.publish("tractors/TSECB1/telemetry", foreign)  # A's subscriptions outside its tree deliver nothing
        watcher.publish("tractors/TSECA1/status", mine)
        a.wait_for(mine)
        assert foreign not in a.payloads()

        forged, own = _marker("forged"), _marker("own")
        for topic in ("tractors/TSECB1/telemetry", "tractors/other/x", "elsewhere"):  # speaking for others
            answer = Peer(secure, a_user, a_pass).offend(topic, forged)
            assert "Not authorized" in answer and "disconnected" in answer, (topic, answer)
        again = Peer(secure, a_user, a_pass)  # after each refusal: so anything forged would have arrived first
        again.publish("tractors/TSECA1/telemetry", own)
        again.close()
        watcher.wait_for(own)
        assert forged not in watcher.payloads()
    finally:
        a.close()
        watcher.close()


def test_the_bridge_identity_can_read_but_not_publish(secure: Settings) -> None:
    watcher = Peer(secure, *service_credentials(secure, "simulator"))
    try:
        assert watcher.subscribe("tractors/#")
        forged, real = _marker("from-bridge"), _marker("from-simulator")
        for topic in ("tractors/TSECA1/telemetry", "tractors/TSECA1/status"):
            answer = Peer(secure, *service_credentials(secure, "bridge")).offend(topic, forged)
            assert "Not authorized" in answer, answer
        watcher.publish("tractors/TSECA1/status", real)
        watcher.wait_for(real)
        assert forged not in watcher.payloads()
    finally:
        watcher.close()


def _telemetry(s: Settings, topic: str) -> list[bytes]:
    consumer = KafkaConsumer(bootstrap_servers=s.bootstrap, enable_auto_commit=False, group_id=None)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        values: list[bytes] = []
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            for recs in consumer.poll(timeout_ms=500).values():
                values += [r.value for r in recs]
        return values
    finally:
        consumer.close()


def test_tls_with_the_generated_certificates_carries_telemetry_end_to_end(secure: Settings) -> None:
    ca = str(certs_dir(secure) / "ca.crt")
    user, password = tractor_credentials(secure, "TSECTLS")
    ts = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 60))
    seq = int(time.time())
    payload = json.dumps({"v": 1, "tractor_id": "TSECTLS", "seq": seq, "samples": [
        {"ts": ts, "engine_hours": 12.5, "readings": {"oil_pressure_kpa": 301.5}}]}).encode()
    tractor = Peer(secure, user, password, tls=True, ca=ca)
    try:
        assert tractor.accepted, f"TLS connection refused: {tractor.reason}"
        tractor.publish("tractors/TSECTLS/telemetry", payload)
    finally:
        tractor.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the bridge itself is connected over TLS (FLEETWATCH_MQTT_TLS)
        if any(json.loads(v).get("seq") == seq for v in _telemetry(secure, secure.topic("telemetry"))):
            break
        time.sleep(1)
    else:
        pytest.fail("telemetry sent over TLS never reached Kafka")

    untrusting = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    untrusting.username_pw_set(user, password)
    untrusting.tls_set()  # the system trust store does not know our local CA
    with pytest.raises(ssl.SSLCertVerificationError):
        untrusting.connect(secure.mqtt_host, secure.mqtt_tls_port)


# ------------------------------------------------------------------ API
@pytest.fixture(scope="module")
def tokens(secure: Settings) -> dict[str, str]:
    """One API token per role, made with ``fleetwatch tokens create`` (its secret is printed once)."""
    from typer.testing import CliRunner

    from fleetwatch.cli import app

    made = {}
    for role in ("analyst", "operator", "admin"):
        result = CliRunner().invoke(app, ["tokens", "create", "--role", role, "--name", f"security {role}"])
        assert result.exit_code == 0, result.output
        made[role] = next(line for line in result.output.splitlines() if line.startswith("fw_"))
        SECRETS.append(made[role])
    return made


def test_api_refuses_missing_bad_and_underprivileged_tokens(secure: Settings, tokens: dict[str, str]) -> None:
    base = f"http://{secure.api_host}:{secure.api_port}"
    analyst, operator, admin = tokens["analyst"], tokens["operator"], tokens["admin"]
    with httpx.Client(base_url=base, timeout=30) as api:
        for headers in ({}, {"Authorization": "Bearer fw_not-a-token"}, {"Authorization": "Basic YWRtaW46YWRtaW4="},
                        {"Authorization": "Bearer " + "x" * 10_000}):
            for path in ("/api/orders", "/api/fleet", "/api/parts", "/api/tokens", "/api/me"):
                assert api.get(path, headers=headers).status_code == 401, (path, headers.keys())
        auth = {r: {"Authorization": f"Bearer {t}"} for r, t in
                (("analyst", analyst), ("operator", operator), ("admin", admin))}
        assert api.get("/api/orders", headers=auth["analyst"]).status_code == 200
        assert api.post("/api/orders/1/transitions", json={"to": "acknowledged"},
                        headers=auth["analyst"]).status_code == 403
        for role in ("analyst", "operator"):
            assert api.patch("/api/parts/OIL-PUMP", json={"lead_time_h": 1}, headers=auth[role]).status_code == 403
            assert api.post("/api/tokens", json={"role": "admin", "name": "escalate"},
                            headers=auth[role]).status_code == 403
            assert api.get("/api/tokens", headers=auth[role]).status_code == 403
        assert api.get("/api/tokens", headers=auth["admin"]).status_code == 200


HOSTILE_IDS = ["1 OR 1=1", "1; DROP TABLE orders;--", "' OR '1'='1", "../../etc/passwd", "..%2F..%2Fetc%2Fpasswd",
               "%00", "T00001%27%3B--", "$(reboot)", "x" * 3000, "-1", "99999999999999999999999"]


@pytest.mark.parametrize("template", ["/api/orders/{id}", "/api/tractors/{id}", "/api/tractors/{id}/trends/oil_temp_c",
                                      "/api/tractors/T00001/trends/{id}", "/api/parts/{id}"])
def test_injection_and_path_strings_in_api_ids_are_4xx_and_harmless(secure: Settings, tokens: dict[str, str],
                                                                     template: str) -> None:
    base = f"http://{secure.api_host}:{secure.api_port}"
    headers = {"Authorization": f"Bearer {tokens['admin']}"}
    with httpx.Client(base_url=base, timeout=30) as api:
        for hostile in HOSTILE_IDS:
            path = template.format(id=hostile)
            for got in (api.get(path, headers=headers), api.patch(path, json={"lead_time_h": 1}, headers=headers),
                        api.post(path + "/transitions", json={"to": "cancelled"}, headers=headers)):
                assert got.status_code < 500, (got.request.method, path[:80], got.status_code, got.text[:200])
                if got.status_code == 200:  # "-1" is a well-formed tractor id: an empty answer about exactly it
                    assert got.json().get("tractor_id") == hostile and not got.json().get("windows"), got.text[:200]
                else:
                    assert 400 <= got.status_code < 500
        assert api.get("/api/orders", headers=headers).status_code == 200  # the tables are all still there
        parts = api.get("/api/parts", headers=headers)
        assert parts.status_code == 200 and {p["part_id"]: p for p in parts.json()}["OIL-PUMP"]["lead_time_h"] > 1


@pytest.mark.parametrize("args", [
    ["orders", "show", "1; DROP TABLE orders"],
    ["orders", "ack", "../../etc/passwd"],
    ["devices", "add", "../../etc/passwd"],
    ["devices", "add", "T1' OR '1'='1"],
    ["devices", "revoke", "svc.bridge"],
    ["devices", "revoke", "$(reboot)"],
    ["simulate", "--scenario", "../../../etc/passwd", "--days", "0.01"],
    ["simulate", "--scenario", "/etc/shadow.toml", "--days", "0.01"],
    ["functions", "run", "../../x"],
    ["tokens", "create", "--role", "root' OR 1=1"],
])
def test_hostile_ids_on_the_command_line_get_a_message_and_an_exit_code(secure: Settings, args: list[str]) -> None:
    from typer.testing import CliRunner

    from fleetwatch.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.output.strip(), "no message saying what is wrong"


# ------------------------------------------------------------------ fairness
def _reading(tractor: str, seq: int) -> bytes:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 120))
    return json.dumps({"v": 1, "tractor_id": tractor, "seq": seq, "samples": [
        {"ts": ts, "engine_hours": 1.0, "readings": {"oil_pressure_kpa": 300.0}}]}).encode()


def test_a_flooding_tractor_does_not_starve_the_others(secure: Settings) -> None:
    """The bridge forwards in broker arrival order: a quiet tractor's messages interleave with a flood."""
    ca = str(certs_dir(secure) / "ca.crt")
    flooder = Peer(secure, *tractor_credentials(secure, "TFLOOD"), tls=True, ca=ca)
    quiet = Peer(secure, *tractor_credentials(secure, "TQUIET"), tls=True, ca=ca)
    flood = 4000
    base = int(time.time()) * 10_000
    try:
        infos = [flooder.client.publish("tractors/TFLOOD/telemetry", _reading("TFLOOD", base + i), qos=1)
                 for i in range(flood // 4)]
        for i in range(10):  # the quiet tractor speaks while the flood is being queued
            quiet.publish("tractors/TQUIET/telemetry", _reading("TQUIET", base + i))
        infos += [flooder.client.publish("tractors/TFLOOD/telemetry", _reading("TFLOOD", base + i), qos=1)
                  for i in range(flood // 4, flood)]
        for info in infos:
            info.wait_for_publish(60)
    finally:
        quiet.close()
        flooder.close()
    consumer = KafkaConsumer(bootstrap_servers=secure.bootstrap, enable_auto_commit=False, group_id=None)
    topic = secure.topic("telemetry")
    stamps: dict[str, list[int]] = {"TFLOOD": [], "TQUIET": []}
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + 120
        while (len(stamps["TFLOOD"]) < flood or len(stamps["TQUIET"]) < 10) and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=500).values():
                for r in recs:
                    doc = json.loads(r.value)
                    if doc.get("tractor_id") in stamps and doc.get("seq", 0) >= base:
                        stamps[doc["tractor_id"]].append(r.timestamp)
    finally:
        consumer.close()
    assert len(stamps["TQUIET"]) == 10 and len(stamps["TFLOOD"]) == flood, {k: len(v) for k, v in stamps.items()}
    # Every quiet message reached Kafka before the flood was through: it waited for its place, not for the flood.
    assert max(stamps["TQUIET"]) < max(stamps["TFLOOD"])


# ------------------------------------------------------------------ secrets (runs last in the module)
def test_passwords_and_tokens_never_reach_logs_or_the_dlq(secure: Settings, services: Settings) -> None:
    a_user, a_pass = tractor_credentials(secure, "TSECA1")
    tractor = Peer(secure, a_user, a_pass)
    try:  # a dead letter that carries the sender's identity, to see what the DLQ keeps of it
        tractor.publish("tractors/TSECA1/telemetry", b'{"v":1,"tractor_id":"TSECA1","seq":')
    finally:
        tractor.close()
    mosq = secure.run_dir / "mosquitto"
    secrets = [*SECRETS, a_pass]
    secrets += [entry["password"] for entry in json.loads((mosq / "service-credentials.json").read_text()).values()]
    secrets += list(json.loads((mosq / "simulated-tractors.json").read_text()).values())
    token_file = secure.run_dir / "operator-token"
    secrets.append(token_file.read_text().strip())
    key_body = (certs_dir(secure) / "server.key").read_text().splitlines()[1]
    secrets.append(key_body)
    assert len(secrets) >= 8 and all(len(x) >= 16 for x in secrets)

    for private in (mosq / "service-credentials.json", mosq / "simulated-tractors.json", mosq / "passwd", token_file,
                    certs_dir(secure) / "server.key"):
        assert stat.S_IMODE(private.stat().st_mode) & 0o077 == 0, f"{private} is readable by others"

    time.sleep(2)  # let supervisord flush the workers' output
    logs = [p for root in (secure.run_dir, services.run_dir / "logs") for p in Path(root).rglob("*")
            if p.is_file() and (p.suffix == ".log" or ".log." in p.name)]
    assert any(p.name == "bridge.log" for p in logs) and any(p.name == "api.log" for p in logs)
    for path in logs:
        text = path.read_bytes().decode("utf-8", errors="replace")
        leaked = [x[:6] + "…" for x in secrets if x in text]
        assert not leaked, f"{path} contains secrets {leaked}"

    dead = _telemetry(secure, secure.topic("telemetry.dlq"))
    assert dead, "the malformed message never reached the DLQ"
    for value in dead:
        text = value.decode("utf-8", errors="replace")
        assert not [x for x in secrets if x in text]

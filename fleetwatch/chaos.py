"""Chaos run: a simulated fleet through the full stack while each process is killed -9 in turn, then reconciled.

``run_chaos`` starts Kafka, Mosquitto (persistence on), PostgreSQL, the ingest bridge and both functions on
their own ports and run folder, publishes a seeded fleet (plus a few invalid payloads) from a *device*
subprocess at a steady pace, and at seed-chosen moments kills -9 the simulator, Mosquitto, the bridge, each
function worker, Kafka and PostgreSQL (supervisord restarts the stack's programs; the harness restarts the
device). Afterwards it reconciles by ``(tractor_id, seq)``:

* every valid message is in Kafka ``telemetry`` at least once;
* every trend window closed by the detector counts exactly the readings published for it, and every window
  the detector must have closed is there (so each reading is counted once, none lost, none doubled);
* orders equal those of an undisturbed in-process run of the same messages through the same handlers, and
  no (tractor, part) has two orders;
* every invalid payload is in ``telemetry.dlq`` and no valid one is.

Mosquitto writes its store to disk only every ``autosave_interval`` seconds, so a kill -9 of the broker can
lose QoS 1 messages it already acknowledged. The device therefore keeps what it published in the last
``retention_s`` seconds (besides everything unacknowledged) and re-publishes it, in order, after every
reconnect; a restarted device resumes from a journal it fsyncs twice a second (a real tractor keeps the same
window in flash). Downstream drops the duplicates by ``(tractor_id, seq)``. ``retention_s=0`` turns that off,
which is how the loss it prevents is measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from fleetwatch.settings import Settings

SCENARIO = "oil-pump-demo"
VICTIMS = ("simulator", "mosquitto", "bridge", "fn-trends", "fn-ordering", "kafka", "postgres")
TELEMETRY = "telemetry"
FUNCTIONS = ("trends-detect", "ordering-place")


class ChaosError(RuntimeError):
    """The chaos run could not be carried out (the stack did not come up, the pipeline did not settle)."""


# ---------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Plan:
    """Everything that decides a chaos run; the same plan always publishes the same messages."""

    seed: int = 7
    tractors: int = 8
    days: float = 12.0
    kills: int = 2  # per victim
    publish_s: float = 150.0  # wall seconds the fleet's messages are spread over
    period_s: float = 600.0
    degrading: int = 2
    retention_s: float = 30.0
    invalid: int = 8
    start: str = ""  # ISO-8601 UTC start of the simulated clock (fixed, so restarts regenerate the same stream)
    victims: tuple[str, ...] = VICTIMS
    kafka_brokers: int = 1

    @classmethod
    def reduced(cls, seed: int = 7) -> Plan:
        """The CI-sized run: every victim killed once, about a minute of publishing."""
        return cls(seed=seed, tractors=4, days=10.0, kills=1, publish_s=60.0, invalid=6, degrading=2)

    def with_start(self) -> Plan:
        """This plan with its simulated start fixed so the run ends about now."""
        if self.start:
            return self
        # The latest Monday 00:00 UTC that leaves room for the whole run: the same stream all week long.
        latest = datetime.now(UTC) - timedelta(days=self.days + 1)
        begin = (latest - timedelta(days=latest.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
        return Plan(**{**asdict(self), "start": begin.isoformat(), "victims": tuple(self.victims)})


def schedule(plan: Plan) -> list[tuple[float, str]]:
    """(seconds after publishing starts, victim) for every kill: one random moment per slot, seeded order."""
    rng = np.random.default_rng([plan.seed, 17])
    order: list[str] = []
    for _ in range(plan.kills):
        order += [plan.victims[i] for i in rng.permutation(len(plan.victims))]
    if not order:
        return []
    lo, hi = 0.08 * plan.publish_s, 0.88 * plan.publish_s
    slot = (hi - lo) / len(order)
    return [(lo + k * slot + float(rng.uniform(0.1, 0.9)) * slot, victim) for k, victim in enumerate(order)]


# ---------------------------------------------------------------------------------------------- messages
def invalid_payloads(plan: Plan, tractor_ids: list[str], start: datetime) -> list[tuple[str, bytes]]:
    """Payloads the validator must reject as a whole (each unique), as (tractor_id, payload)."""
    rng = np.random.default_rng([plan.seed, 23])
    ts = (start + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    out: list[tuple[str, bytes]] = []
    for k in range(plan.invalid):
        tid = tractor_ids[int(rng.integers(len(tractor_ids)))]
        other = tractor_ids[(tractor_ids.index(tid) + 1) % len(tractor_ids)]
        seq = 10**12 + k
        sample = {"ts": ts, "engine_hours": 100.0 + k, "readings": {"oil_pressure_kpa": 300.0}}
        kind = k % 7
        doc: Any
        if kind == 0:
            out.append((tid, f'{{"v":1,"tractor_id":"{tid}","seq":{seq},"samples":[{{"ts"'.encode()))
            continue
        if kind == 1:
            doc = {"v": 2, "tractor_id": tid, "seq": seq, "samples": [sample]}
        elif kind == 2:
            doc = {"v": 1, "tractor_id": tid, "seq": seq,
                   "samples": [{**sample, "readings": {f"chaos_signal_{k}": 1.0}}]}
        elif kind == 3:
            doc = {"v": 1, "tractor_id": tid, "seq": seq,
                   "samples": [{**sample, "readings": {"oil_pressure_kpa": 5000.0 + k}}]}
        elif kind == 4:
            doc = {"v": 1, "tractor_id": other, "seq": seq, "samples": [sample]}
        elif kind == 5:
            doc = {"v": 1, "tractor_id": tid, "seq": -k - 1, "samples": [sample]}
        else:
            doc = {"v": 1, "tractor_id": tid, "seq": seq, "samples": [{**sample, "ts": f"yesterday-{k}"}]}
        out.append((tid, json.dumps(doc).encode()))
    return out


def messages(plan: Plan) -> tuple[list[tuple[str, bytes]], set[int]]:
    """Every message the device publishes, in order, as (topic, payload); plus the indexes of the invalid ones."""
    from fleetwatch.db import CATALOG, load_catalog
    from ingest.contract import telemetry_topic
    from simulators.publish import iter_messages
    from simulators.scenario import build, load

    start = datetime.fromisoformat(plan.start)
    fleet, days, period = build(load(SCENARIO), tractors=plan.tractors, days=plan.days, seed=plan.seed,
                                period_s=plan.period_s, degrading=plan.degrading, start=start,
                                catalog=load_catalog(CATALOG))
    out = [(telemetry_topic(tid), payload) for tid, payload in iter_messages(fleet, days, period)]
    bad = invalid_payloads(plan, fleet.ids, start)
    rng = np.random.default_rng([plan.seed, 29])
    positions = sorted((int(p) for p in rng.integers(0, len(out) + 1, size=len(bad))), reverse=True)
    for pos, (tid, payload) in zip(positions, bad, strict=True):
        out.insert(pos, (telemetry_topic(tid), payload))
    invalid = {i for i, (_, p) in enumerate(out) if p in {b for _, b in bad}}
    return out, invalid


# ---------------------------------------------------------------------------------------------- the device
class Retention:
    """What the device must still be able to re-publish: unacknowledged messages and those acked < R s ago.

    Acks arrive on paho's network thread (under paho's own lock), so they are only queued there and applied
    on the publishing thread, which also owns every other field.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.pending: dict[int, float | None] = {}  # message index -> ack time (None: not yet acknowledged)
        self.mids: dict[int, int] = {}
        self.acks: deque[int] = deque()
        self.last_ack = 0.0

    def sent(self, mid: int, index: int) -> None:
        """Message ``index`` left with packet id ``mid``."""
        self.mids[mid] = index
        self.pending[index] = None

    def on_ack(self, mid: int) -> None:
        """Called from paho's thread: remember the ack for ``apply``."""
        self.acks.append(mid)

    def apply(self, now: float) -> None:
        """Apply queued acks and forget messages acknowledged longer than the retention ago."""
        while self.acks:
            index = self.mids.pop(self.acks.popleft(), None)
            if index is not None and index in self.pending:
                self.pending[index] = now
                self.last_ack = now
        for index, acked in list(self.pending.items()):
            if acked is None or acked > now - self.seconds:
                break
            del self.pending[index]

    @property
    def unacked(self) -> int:
        """Messages sent on this connection and not yet acknowledged."""
        return sum(1 for t in self.pending.values() if t is None)

    def resume_point(self, next_index: int) -> int:
        """Index to re-publish from after a reconnect or restart."""
        return next(iter(self.pending), next_index)

    def restart(self, next_index: int) -> int:
        """Forget this connection's state; returns where publishing resumes."""
        point = self.resume_point(next_index)
        self.pending.clear()
        self.mids.clear()
        self.acks.clear()
        return point


def _write_journal(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _link(host: str, port: int, client_id: str, user: str | None, password: str | None,
          retention: Retention) -> Any:  # noqa: ANN401 (a Gateway subclass built lazily)
    """A ``simulators.publish.Gateway`` whose acks feed ``retention`` and that never reconnects by itself."""
    from simulators.publish import Gateway

    class Link(Gateway):
        lost: threading.Event

        def _on_publish(self, client: Any, userdata: object, mid: int, reason: object,  # noqa: ANN401
                        props: object) -> None:
            super()._on_publish(client, userdata, mid, reason, props)
            retention.on_ack(mid)

        def send(self, topic: str, payload: bytes) -> int:
            import paho.mqtt.client as mqtt

            info = self.client.publish(topic, payload, qos=1)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                self.lost.set()
            return int(info.mid)

        def abandon(self) -> None:
            try:
                self.client.disconnect()
            finally:
                self.client.loop_stop()

    link = Link(host, port, client_id, max_inflight=500, username=user, password=password)
    link.lost = threading.Event()
    # paho would re-send its in-flight messages after reconnecting on its own, ahead of older retained ones;
    # the device reconnects itself instead and re-publishes strictly in order.
    link.client.reconnect_delay_set(3600, 3600)
    link.client.on_disconnect = lambda *args: link.lost.set()
    return link


def device_main(config_file: Path) -> int:
    """The chaos device: publish the plan's messages at a steady pace, surviving broker and own restarts."""
    from fleetwatch.credentials import service_credentials

    cfg = json.loads(config_file.read_text())
    plan = Plan(**{**cfg["plan"], "victims": tuple(cfg["plan"]["victims"])})
    s = Settings()
    msgs, _ = messages(plan)
    journal = Path(cfg["journal"])
    state = json.loads(journal.read_text()) if journal.exists() else {"resume": 0, "done": False}
    if state.get("done"):
        return 0
    user, password = service_credentials(s, "simulator")
    rate = len(msgs) / plan.publish_s
    retention = Retention(plan.retention_s)
    index = int(state["resume"])
    began = float(cfg["t0"])  # wall clock of the first start: a restarted device catches up with the schedule
    link = None
    saved_at = 0.0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.is_set():
        now = time.monotonic()
        if link is None:
            try:
                link = _link(s.mqtt_host, s.mqtt_port, f"{s.mqtt_client_prefix}-chaos-device-{time.time_ns()}",
                             user, password, retention)
            except (OSError, ConnectionError):
                time.sleep(0.5)
                continue
            index = retention.restart(index)
        retention.apply(now)
        if link.lost.is_set():
            link.abandon()
            link = None
            continue
        if now - saved_at > 0.5:
            _write_journal(journal, {"resume": retention.resume_point(index), "done": False})
            saved_at = now
        if index < len(msgs):
            due = began + index / rate - time.time()
            if due > 0 or retention.unacked >= 400:
                time.sleep(min(max(due, 0.002), 0.05))
                continue
            topic, payload = msgs[index]
            retention.sent(link.send(topic, payload), index)
            index += 1
        elif retention.unacked == 0 and now - retention.last_ack >= plan.retention_s:
            break
        else:
            time.sleep(0.05)
    if link is not None:
        link.abandon()
    if not stop.is_set():
        _write_journal(journal, {"resume": len(msgs), "done": True})
    return 0


# ---------------------------------------------------------------------------------------------- harness
@dataclass
class Kill:
    """One injected fault."""

    at_s: float
    victim: str
    target: str
    recovered_s: float | None = None
    note: str = ""


@dataclass
class Check:
    """One line of the reconciliation table."""

    name: str
    expected: Any
    found: Any
    ok: bool
    note: str = ""


@dataclass
class ChaosResult:
    """What the run did and what reconciliation found."""

    plan: Plan
    kills: list[Kill] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when nothing was lost or doubled."""
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        """The result as plain JSON."""
        return {"plan": asdict(self.plan), "ok": self.ok, "kills": [asdict(k) for k in self.kills],
                "checks": [asdict(c) for c in self.checks], "figures": self.figures}


def chaos_environment(base: Settings, plan: Plan, port_offset: int) -> dict[str, str]:
    """FLEETWATCH_* values of the chaos stack: its own run folder and ports, fresh topics and database."""
    tag = f"c{plan.seed}x{uuid.uuid4().hex[:6]}"
    brokers = max(plan.kafka_brokers, 1)
    env = {
        "FLEETWATCH_RUN_DIR": str(base.run_dir / "chaos"),
        "FLEETWATCH_KAFKA_PORT": str(base.kafka_port + port_offset),
        "FLEETWATCH_KAFKA_CONTROLLER_PORT": str(base.kafka_controller_port + port_offset),
        "FLEETWATCH_MQTT_PORT": str(base.mqtt_port + port_offset),
        "FLEETWATCH_PG_PORT": str(base.pg_port + port_offset),
        "FLEETWATCH_API_PORT": str(base.api_port + port_offset),
        "FLEETWATCH_INGEST_METRICS_PORT": str(base.ingest_metrics_base + port_offset),
        "FLEETWATCH_MQTT_SESSION_EXPIRY_S": "900",
        "FLEETWATCH_INGEST_WORKERS": "1",
        "FLEETWATCH_TOPIC_PREFIX": f"{tag}-",
        "FLEETWATCH_KAFKA_BROKERS": str(brokers),
        "FLEETWATCH_KAFKA_REPLICATION": str(min(brokers, 3)),
        "FLEETWATCH_KAFKA_MIN_INSYNC": "2" if brokers >= 3 else "1",
    }
    env["FLEETWATCH_DATABASE_URL"] = (f"postgresql+psycopg://{base.pg_user}@127.0.0.1:"
                                      f"{base.pg_port + port_offset}/{tag}")
    return env


class Harness:
    """Drives one chaos run against a stack configured by the current FLEETWATCH_* environment."""

    def __init__(self, plan: Plan, say: Callable[[str], None]) -> None:
        from fleetwatch.stack import Stack

        self.plan = plan
        self.say = say
        self.s = Settings()
        self.stack = Stack(self.s)
        self.folder = self.s.run_dir / "chaos-runs" / self.s.topic_prefix.rstrip("-")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.device: subprocess.Popen[bytes] | None = None
        self.device_restarts = 0
        self.device_log = self.folder / "device.log"

    # ------------------------------------------------------------------ stack
    def up(self) -> None:
        """Start the infrastructure and the workers on a fresh database and topics."""
        import shutil

        import psycopg

        from fleetwatch.db import upgrade
        from fleetwatch.pipeline import ensure_topics

        self.stack.ensure_debian_packages()
        self.stack.down()
        # A clean broker store: sessions of earlier runs would keep queuing this run's messages.
        shutil.rmtree(self.s.run_dir / "mosquitto" / "data", ignore_errors=True)
        self.stack.start(["kafka", "mosquitto", "postgres"])
        name = self.s.db_url.rsplit("/", 1)[1]
        with psycopg.connect(f"host=127.0.0.1 port={self.s.pg_port} user={self.s.pg_user} dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        upgrade(self.s.db_url)
        ensure_topics(self.s)
        self.stack.start(["bridge", "fn-trends", "fn-ordering"])

    def down(self) -> None:
        """Stop every process of the chaos stack."""
        self.stop_device()
        self.stack.down()

    # ------------------------------------------------------------------ device
    def start_device(self) -> None:
        """Start (or restart) the device subprocess; it resumes from its journal."""
        cfg = self.folder / "device.json"
        if not cfg.exists():
            cfg.write_text(json.dumps({"plan": asdict(self.plan), "journal": str(self.folder / "journal.json"),
                                       "t0": time.time()}))
        with open(self.device_log, "ab") as log:
            self.device = subprocess.Popen([sys.executable, "-m", "fleetwatch.chaos", "device", str(cfg)],
                                           stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())

    def stop_device(self) -> None:
        """Kill the device subprocess if it still runs."""
        if self.device is not None and self.device.poll() is None:
            self.device.kill()
            self.device.wait()

    def device_done(self) -> bool:
        """True once the device published everything and its retention window passed."""
        journal = self.folder / "journal.json"
        return journal.exists() and bool(json.loads(journal.read_text()).get("done"))

    def keep_device_alive(self) -> None:
        """Restart the device if it died without finishing (counts as an unplanned restart)."""
        if self.device is not None and self.device.poll() is not None and not self.device_done():
            self.device_restarts += 1
            if self.device_restarts > 5:
                raise ChaosError(f"the device keeps dying; see {self.device_log}")
            self.say(f"device exited with {self.device.returncode}; restarting it")
            self.start_device()

    # ------------------------------------------------------------------ faults
    def _target(self, victim: str, rng: np.random.Generator) -> str:
        if victim == "kafka" and self.s.kafka_brokers > 1:
            leader = self._telemetry_leader()
            return f"kafka-{leader or int(rng.integers(1, self.s.kafka_brokers + 1))}"
        return victim

    def _telemetry_leader(self) -> int | None:
        """Node id leading partition 0 of ``telemetry`` (the broker whose loss hurts most), if known."""
        from kafka import KafkaAdminClient

        try:
            admin = KafkaAdminClient(bootstrap_servers=self.s.bootstrap, request_timeout_ms=5000)
        except Exception:  # noqa: BLE001 - no answer: fall back to a random broker
            return None
        try:
            desc = admin.describe_topics([self.s.topic("telemetry")])[0]
            leaders = [p["leader_id"] for p in desc["partitions"] if p["partition_index"] == 0]
            return int(leaders[0]) if leaders and leaders[0] >= 0 else None
        except Exception:  # noqa: BLE001
            return None
        finally:
            admin.close()

    def kill(self, victim: str, target: str) -> str:
        """kill -9 one process; returns a note."""
        if victim == "simulator":
            assert self.device is not None
            if self.device.poll() is not None:
                return "device had already finished"
            os.kill(self.device.pid, signal.SIGKILL)
            self.device.wait()
            time.sleep(1.0)
            self.start_device()
            return f"pid {self.device.pid} restarted from its journal"
        self.stack.signal(target, "KILL")
        return ""

    def recover(self, target: str, timeout: float = 120.0) -> float:
        """Seconds until the killed program runs (and answers) again; restarts it once if supervisord gave up."""
        started = time.monotonic()
        if target == "simulator":
            return 0.0
        time.sleep(0.5)
        restarted = False
        while time.monotonic() - started < timeout:
            self.keep_device_alive()
            state = self.stack.status().get(target, "")
            if state == "RUNNING":
                try:
                    self.stack.wait_ready(target)
                except Exception:  # noqa: BLE001 - not ready yet; keep polling until the timeout
                    continue
                return time.monotonic() - started
            if state in ("FATAL", "EXITED", "STOPPED") and not restarted:
                self.say(f"supervisord left {target} {state}; starting it again")
                self.stack.start([target])
                restarted = True
            time.sleep(0.3)
        raise ChaosError(f"{target} did not come back within {timeout:.0f}s")

    # ------------------------------------------------------------------ run
    def run(self) -> list[Kill]:
        """Publish with kills at the scheduled moments; returns the faults injected."""
        rng = np.random.default_rng([self.plan.seed, 31])
        plan_kills = schedule(self.plan)
        self.start_device()
        began = time.monotonic()
        done: list[Kill] = []
        for at, victim in plan_kills:
            while time.monotonic() - began < at:
                self.keep_device_alive()
                time.sleep(0.1)
            target = self._target(victim, rng)
            kill = Kill(round(time.monotonic() - began, 1), victim, target)
            self.say(f"t={kill.at_s:6.1f}s kill -9 {target}")
            kill.note = self.kill(victim, target)
            kill.recovered_s = round(self.recover(target), 1)
            done.append(kill)
        deadline = time.monotonic() + self.plan.publish_s * 3 + 300
        while not self.device_done():
            if time.monotonic() > deadline:
                raise ChaosError("the device did not finish publishing")
            self.keep_device_alive()
            time.sleep(0.3)
        self.stop_device()
        return done


# ---------------------------------------------------------------------------------------------- reconciliation
def _partition(key: bytes, partitions: int) -> int:
    from kafka.partitioner.default import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


def _read_topic(s: Settings, topic: str) -> list[tuple[int, bytes | None, bytes]]:
    """Every record of a topic as (partition, key, value)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=s.bootstrap, enable_auto_commit=False, group_id=None)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return []
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        out: list[tuple[int, bytes | None, bytes]] = []
        idle = 0
        while any(consumer.position(tp) < ends[tp] for tp in tps) and idle < 50:
            batch = consumer.poll(timeout_ms=500)
            idle = 0 if batch else idle + 1
            for recs in batch.values():
                out += [(r.partition, r.key, r.value or b"") for r in recs]
        return out
    finally:
        consumer.close()


@dataclass
class Expected:
    """What the device published, normalised the way the bridge forwards it."""

    valid: dict[tuple[str, int], dict[str, Any]]
    invalid_sha: set[str]
    valid_sha: set[str]
    windows: Counter[tuple[str, str, int]]
    last_ts: dict[str, float]


def expected(plan: Plan) -> Expected:
    """The reference stream: valid messages by (tractor_id, seq), invalid payload digests, window counts."""
    from ingest.validate import validate

    msgs, invalid = messages(plan)
    now = datetime.now(UTC)
    valid: dict[tuple[str, int], dict[str, Any]] = {}
    windows: Counter[tuple[str, str, int]] = Counter()
    last: dict[str, float] = {}
    invalid_sha: set[str] = set()
    valid_sha: set[str] = set()
    for i, (topic, payload) in enumerate(msgs):
        if i in invalid:
            invalid_sha.add(hashlib.sha256(payload).hexdigest())
            continue
        verdict = validate(topic, payload, now)
        if verdict.message is None or verdict.rejections:
            raise ChaosError(f"the simulator produced an invalid message: {verdict.rejections[:1]}")
        msg = verdict.message
        valid[(msg["tractor_id"], msg["seq"])] = msg
        valid_sha.add(hashlib.sha256(payload).hexdigest())
        for sample in msg["samples"]:
            ts = datetime.fromisoformat(sample["ts"]).timestamp()
            last[msg["tractor_id"]] = max(last.get(msg["tractor_id"], 0.0), ts)
            for signal_name in sample["readings"]:
                windows[(msg["tractor_id"], signal_name, int(ts // 3600 * 3600))] += 1
    return Expected(valid, invalid_sha, valid_sha, windows, last)


def reference_orders(s: Settings, exp: Expected, folder: Path) -> list[tuple[str, str]]:
    """Orders of an undisturbed run: the same messages through the same handlers, in-process, on SQLite."""
    from sqlalchemy import select

    from fleetwatch.db import upgrade
    from functions import store
    from functions.config import load_functions
    from functions.db import make_engine, make_sessions
    from functions.local import MemorySource, run_local
    from functions.runtime import load_handler
    from ordering.tables import orders

    db = folder / "reference.db"
    db.unlink(missing_ok=True)
    url = f"sqlite:///{db}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessions(engine)
    fns = load_functions(s.functions_path)
    try:
        source = MemorySource()
        for (tid, _), msg in sorted(exp.valid.items(), key=lambda kv: (kv[1]["samples"][0]["ts"], kv[0])):
            key = tid.encode()
            source.append(TELEMETRY, _partition(key, s.kafka_partitions), json.dumps(msg).encode(), key)
        trends = fns["trends-detect"]
        run_local(trends, load_handler(trends.handler), source, sessions)
        alerts = MemorySource()
        with sessions() as session:
            for row in session.execute(select(store.outbox).where(store.outbox.c.source == trends.name)
                                       .order_by(store.outbox.c.id)):
                alerts.append("wear-alerts", _partition(row.key or b"", s.kafka_partitions), row.value, row.key)
        placing = fns["ordering-place"]
        run_local(placing, load_handler(placing.handler), alerts, sessions)
        with sessions() as session:
            return sorted((r.tractor_id, r.part_id) for r in session.execute(select(orders)))
    finally:
        engine.dispose()


def _trend_params(s: Settings) -> tuple[int, int]:
    from functions.config import load_functions

    params = load_functions(s.functions_path)["trends-detect"].params
    return int(params.get("window_s", 3600)), int(params.get("lateness_s", 900))


def wait_settled(s: Settings, exp: Expected, timeout: float, say: Callable[[str], None]) -> set[tuple[str, int]]:
    """Wait until Kafka holds every valid message and both functions caught up; returns what Kafka holds."""
    from fleetwatch.pipeline import Progress

    progress = Progress(s)
    deadline = time.monotonic() + timeout
    calm = 0
    seen: set[tuple[str, int]] = set()
    try:
        while time.monotonic() < deadline:
            seen = {(d["tractor_id"], d["seq"]) for d in _telemetry_docs(s)}
            missing = len(set(exp.valid) - seen)
            lags = {name: progress.lag(name) for name in FUNCTIONS}
            pending = progress.outbox_pending()
            if missing == 0 and not any(lags.values()) and pending == 0:
                calm += 1
                if calm >= 3:
                    return seen
            else:
                calm = 0
            say(f"settling: {missing} valid messages not in Kafka, lag {lags}, outbox {pending}")
            time.sleep(2.0)
        return seen
    finally:
        progress.close()


def _telemetry_docs(s: Settings) -> list[dict[str, Any]]:
    out = []
    for _, _, value in _read_topic(s, s.topic(TELEMETRY)):
        try:
            out.append(json.loads(value))
        except ValueError:
            out.append({"tractor_id": "?", "seq": -1, "samples": []})
    return out


def reconcile(s: Settings, plan: Plan, exp: Expected, folder: Path, settle_timeout: float,
              say: Callable[[str], None]) -> tuple[list[Check], dict[str, Any]]:
    """Compare what the pipeline holds with what was published; one Check per guarantee."""
    from sqlalchemy import func, select

    from functions.db import make_engine
    from ordering.tables import orders
    from trends.tables import trend_windows

    wait_settled(s, exp, settle_timeout, say)
    docs = _telemetry_docs(s)
    copies = Counter((d.get("tractor_id"), d.get("seq")) for d in docs)
    in_kafka = set(copies)
    lost_kafka = sorted(set(exp.valid) - in_kafka)
    strangers = [k for k in in_kafka if k not in exp.valid]
    changed = [k for k, d in (((d.get("tractor_id"), d.get("seq")), d) for d in docs)
               if k in exp.valid and d.get("samples") != exp.valid[k]["samples"]]
    checks = [
        Check("valid messages in Kafka (at least once)", len(exp.valid), len(set(exp.valid) & in_kafka),
              not lost_kafka, f"{sum(copies.values()) - len(copies)} extra copies (dropped downstream by seq)"),
        Check("Kafka records not published or altered", 0, len(strangers) + len(changed),
              not strangers and not changed),
    ]

    dlq = []
    for _, _, value in _read_topic(s, s.topic("telemetry.dlq")):
        try:
            dlq.append(json.loads(value))
        except ValueError:
            dlq.append({})
    dlq_sha = {d.get("payload_sha256") for d in dlq}
    checks.append(Check("invalid inputs in the DLQ", len(exp.invalid_sha), len(exp.invalid_sha & dlq_sha),
                        exp.invalid_sha <= dlq_sha, f"{len(dlq)} dead letters"))
    checks.append(Check("valid messages dead-lettered", 0, len(exp.valid_sha & dlq_sha),
                        not exp.valid_sha & dlq_sha))

    window_s, lateness_s = _trend_params(s)
    engine = make_engine(s.db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(trend_windows.c.tractor_id, trend_windows.c.signal,
                                       trend_windows.c.window_start, trend_windows.c.count)).all()
            placed = sorted((r.tractor_id, r.part_id) for r in conn.execute(select(orders)))
            open_dupes = conn.execute(
                select(orders.c.tractor_id, orders.c.part_id, orders.c.episode_id, func.count())
                .group_by(orders.c.tractor_id, orders.c.part_id, orders.c.episode_id)
                .having(func.count() > 1)).all()
    finally:
        engine.dispose()
    counted: dict[tuple[str, str, int], int] = {}
    for r in rows:
        start = r.window_start if r.window_start.tzinfo else r.window_start.replace(tzinfo=UTC)
        counted[(r.tractor_id, r.signal, int(start.timestamp()))] = int(r.count)
    must_close = {k for k in exp.windows if k[2] + window_s + lateness_s <= exp.last_ts.get(k[0], 0.0)}
    missing_windows = must_close - set(counted)
    wrong = {k: (exp.windows.get(k, 0), n) for k, n in counted.items() if exp.windows.get(k, 0) != n}
    surplus = sum(max(n - e, 0) for e, n in wrong.values())
    deficit = sum(max(e - n, 0) for e, n in wrong.values()) + sum(exp.windows[k] for k in missing_windows)
    in_closed = sum(exp.windows[k] for k in set(counted) | must_close if k in exp.windows)
    checks.append(Check("readings counted in closed trend windows", in_closed, sum(counted.values()),
                        not wrong and not missing_windows,
                        f"{len(counted)} windows; {sum(exp.windows.values()) - in_closed} readings in still-open "
                        "windows"))
    checks.append(Check("readings lost (not counted)", 0, deficit, deficit == 0))
    checks.append(Check("readings counted twice", 0, surplus, surplus == 0))

    say("reference run: the same messages through the same handlers, undisturbed, in-process")
    reference = reference_orders(s, exp, folder)
    checks.append(Check("orders = undisturbed run", reference, placed, placed == reference))
    dup_orders = len(placed) - len(set(placed)) if open_dupes or len(placed) != len(set(placed)) else 0
    checks.append(Check("duplicate orders", 0, dup_orders, dup_orders == 0))

    failures = {t: len(_read_topic(s, s.topic(f"{t}.failures"))) for t in FUNCTIONS}
    checks.append(Check("records sent to on-failure destinations", 0, sum(failures.values()),
                        not any(failures.values()), ", ".join(f"{k} {v}" for k, v in failures.items())))
    figures = {
        "messages_valid": len(exp.valid), "messages_invalid": len(exp.invalid_sha),
        "readings": sum(exp.windows.values()), "kafka_copies": sum(copies.values()),
        "lost_messages": len(lost_kafka), "lost_readings": deficit, "doubled_readings": surplus,
        "duplicate_orders": dup_orders, "orders": placed, "reference_orders": reference,
        "dead_letters": len(dlq), "windows_checked": len(counted),
        "missing_sample": [list(k) for k in lost_kafka[:10]],
        "wrong_windows_sample": [[k[0], k[1], datetime.fromtimestamp(k[2], UTC).isoformat(), e, n]
                                 for k, (e, n) in sorted(wrong.items())[:20]],
        "missing_windows_sample": [[k[0], k[1], datetime.fromtimestamp(k[2], UTC).isoformat(), exp.windows[k]]
                                   for k in sorted(missing_windows)[:20]],
    }
    return checks, figures


def leaked_secrets(s: Settings, extra: list[Path]) -> list[str]:
    """Log files of the run folder (and ``extra`` folders) that contain a service password."""
    creds = s.run_dir / "mosquitto" / "service-credentials.json"
    secrets = [e["password"] for e in json.loads(creds.read_text()).values()] if creds.exists() else []
    found = []
    for folder in [s.run_dir / "logs", *extra]:
        for path in folder.rglob("*.log*") if folder.exists() else []:
            text = path.read_bytes()
            found += [f"{path.name}" for x in secrets if x.encode() in text]
    return found


def run_chaos(plan: Plan, base: Settings, port_offset: int = 300, keep: bool = False,
              say: Callable[[str], None] = print) -> ChaosResult:
    """Run the whole chaos experiment on its own stack and return the reconciliation."""
    plan = plan.with_start()
    os.environ.update(chaos_environment(base, plan, port_offset))
    harness = Harness(plan, say)
    result = ChaosResult(plan)
    started = time.monotonic()
    try:
        say(f"starting the chaos stack in {harness.s.run_dir} (Kafka {harness.s.bootstrap}, "
            f"MQTT :{harness.s.mqtt_port}, PostgreSQL :{harness.s.pg_port})")
        harness.up()
        say("computing the expected stream")
        exp = expected(plan)
        say(f"publishing {len(exp.valid)} valid + {len(exp.invalid_sha)} invalid messages over ~{plan.publish_s:.0f}s "
            f"with {len(schedule(plan))} kills")
        result.kills = harness.run()
        result.checks, result.figures = reconcile(harness.s, plan, exp, harness.folder,
                                                  settle_timeout=240 + plan.publish_s, say=say)
        states = harness.stack.status()
        not_running = {k: v for k, v in states.items() if v != "RUNNING"}
        result.checks.append(Check("programs running at the end", len(states), len(states) - len(not_running),
                                   not not_running, ", ".join(f"{k} {v}" for k, v in not_running.items())))
        leaks = leaked_secrets(harness.s, [harness.folder])
        result.checks.append(Check("passwords found in logs", 0, len(leaks), not leaks, ", ".join(leaks[:3])))
        result.figures["device_unplanned_restarts"] = harness.device_restarts
        result.figures["wall_s"] = round(time.monotonic() - started, 1)
        (harness.folder / "result.json").write_text(json.dumps(result.to_json(), indent=1, default=str))
        result.figures["result_file"] = str(harness.folder / "result.json")
    finally:
        if not keep:
            harness.down()
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m fleetwatch.chaos device CONFIG``: the device subprocess of a chaos run."""
    parser = argparse.ArgumentParser(prog="python -m fleetwatch.chaos")
    parser.add_argument("role", choices=["device"])
    parser.add_argument("config", type=Path)
    args = parser.parse_args(argv)
    return device_main(args.config)


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------------------------------------- soak
def _program_pids(stack: Any) -> dict[str, int]:  # noqa: ANN401 (fleetwatch.stack.Stack, imported lazily)
    """Pid of every running supervised program."""
    ctl = Path(sys.executable).with_name("supervisorctl")
    out = subprocess.run([str(ctl) if ctl.exists() else "supervisorctl", "-c", str(stack.conf), "status"],
                         capture_output=True, text=True).stdout
    pids = {}
    for line in out.splitlines():
        parts = line.replace(",", " ").split()
        if len(parts) >= 4 and parts[1] == "RUNNING" and parts[2] == "pid":
            pids[parts[0]] = int(parts[3])
    return pids


def _pss_kib(pid: int) -> int:
    """Proportional set size (shared pages split between their users), or VmRSS where the kernel lacks it."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def tree_rss_mib(pid: int) -> float:
    """Memory of a process and its descendants in MiB (PSS, so PostgreSQL's shared buffers count once)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            total += _pss_kib(p)
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo += [int(c) for c in children]
    return total / 1024


def slope_mib_per_h(samples: list[tuple[float, float]]) -> float:
    """Least-squares growth of (seconds, MiB) samples over their second half, in MiB per hour."""
    half = samples[len(samples) // 2:]
    if len(half) < 3:
        return 0.0
    t = np.array([x for x, _ in half])
    y = np.array([v for _, v in half])
    if np.ptp(t) <= 0:
        return 0.0
    return float(np.polyfit(t, y, 1)[0] * 3600)


def run_soak(base: Settings, duration: float, tractors: int, rate: float, port_offset: int = 400,
             say: Callable[[str], None] = print, every_s: float = 5.0) -> dict[str, Any]:
    """Steady load through the full stack for ``duration`` s, sampling each process's RSS; returns the report."""
    days = max(rate * duration / (49.0 * tractors), 1.0)  # the demo fleet sends ~49 messages per tractor-day
    plan = Plan(seed=11, tractors=tractors, days=round(days, 2), kills=0, publish_s=duration, retention_s=0.0,
                invalid=0, victims=()).with_start()
    os.environ.update(chaos_environment(base, plan, port_offset))
    os.environ["FLEETWATCH_RUN_DIR"] = str(base.run_dir / "soak")
    harness = Harness(plan, say)
    samples: dict[str, list[tuple[float, float]]] = {}
    try:
        say(f"starting the soak stack in {harness.s.run_dir}")
        harness.up()
        say(f"generating {tractors} tractors × {plan.days:g} days of telemetry")
        harness.start_device()
        began = time.monotonic()
        while not harness.device_done():
            if time.monotonic() - began > duration * 2 + 300:
                raise ChaosError("the soak publisher did not finish")
            harness.keep_device_alive()
            pids = _program_pids(harness.stack)
            if harness.device is not None and harness.device.poll() is None:
                pids["device"] = harness.device.pid
            now = time.monotonic() - began
            for name, pid in pids.items():
                samples.setdefault(name, []).append((now, tree_rss_mib(pid)))
            say(f"t={now:5.0f}s " + " ".join(f"{k} {v[-1][1]:.0f}" for k, v in sorted(samples.items())) + " MiB")
            time.sleep(every_s)
        harness.stop_device()
        from fleetwatch.pipeline import end_offsets

        stored = sum(end_offsets(harness.s, harness.s.topic(TELEMETRY)).values())
        published, _ = messages(plan)
        report = {
            "duration_s": duration, "rate": rate, "tractors": tractors, "published": len(published),
            "stored_in_kafka": stored, "lost": max(len(published) - stored, 0),
            "processes": {name: {"start_mib": v[0][1], "end_mib": v[-1][1], "max_mib": max(x for _, x in v),
                                 "slope_mib_h": slope_mib_per_h(v),
                                 "rise_2nd_half_mib": slope_mib_per_h(v) * (v[-1][0] - v[len(v) // 2][0]) / 3600,
                                 "samples": v}
                          for name, v in sorted(samples.items()) if v},
        }
        (harness.folder / "soak.json").write_text(json.dumps(report, indent=1))
        return report
    finally:
        harness.down()


# ---------------------------------------------------------------------------------------------- audit
def declared_dependencies(pyproject: Path) -> set[str]:
    """Normalised names of every dependency the project declares (runtime and extras)."""
    import re
    import tomllib

    doc = tomllib.loads(pyproject.read_text())["project"]
    specs = list(doc.get("dependencies", []))
    for extra in doc.get("optional-dependencies", {}).values():
        specs += extra
    return {re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;]", s, maxsplit=1)[0]).lower() for s in specs}


def audit(pyproject: Path, timeout_s: float = 120.0) -> tuple[int, list[tuple[str, str, str, bool]], str]:
    """Run pip-audit on this environment; (exit code, [(package, version, vulnerability id, declared)], note).

    Fails (1) only for known vulnerabilities in packages the project declares; transitive findings and an
    unreachable vulnerability service are reported without failing, so CI never hangs or flaps on them.
    """
    cmd = [sys.executable, "-m", "pip_audit", "-f", "json", "--progress-spinner", "off", "--skip-editable",
           "--timeout", "20"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return 0, [], f"pip-audit did not finish within {timeout_s:.0f}s; not audited this time"
    except OSError as exc:
        return 0, [], f"pip-audit could not run: {exc}"
    try:
        doc = json.loads(out.stdout)
    except ValueError:
        return 0, [], "pip-audit gave no report (vulnerability service unreachable?): " + out.stderr.strip()[-300:]
    declared = declared_dependencies(pyproject)
    found = [(d["name"], d["version"], v["id"], d["name"].lower().replace("_", "-") in declared)
             for d in doc.get("dependencies", []) for v in d.get("vulns", [])]
    audited = len(doc.get("dependencies", []))
    return (1 if any(own for *_, own in found) else 0), found, f"{audited} installed packages audited"

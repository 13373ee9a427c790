"""Bridge throughput from the real Mosquitto to the real Kafka: 1 and 2 processes against a bare baseline.

Each case preloads N messages (12 readings each) into the persistent sessions of its workers while they
are offline, then starts the workers and times how fast the backlog reaches Kafka (end offsets of the
telemetry topic), from the first record written to the last. The baseline, in the same run, is the least
a bridge can do: a bare paho subscriber that lets paho acknowledge on receipt and hands the raw bytes to
a KafkaProducer with the same acks=all/idempotent settings (no validation, no ack-after-Kafka).

On a small shared box the wall-clock rate says more about the neighbours than about the bridge, so each
case also reports where the CPU went, per message: the bridge (or baseline) processes and Kafka during the
drain, Mosquitto during the preload and the drain, and the publisher (this process) during the preload
(psutil, all threads). ``msg per CPU-s`` is
messages per CPU-second of the bridge processes alone: the rate one process reaches with a core to itself.

    python -m bench.bench_bridge [--messages 60000] [--profile]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.common import RESULTS, bench_stack, console, fleet_messages, report
from fleetwatch.settings import Settings

TARGET_MSG_S = 10_000
READINGS_PER_MESSAGE = 12


def _session_props(expiry: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry
    props.ReceiveMaximum = 1000
    return props


def _prepare_session(s: Settings, client_id: str, subscription: str, user: str, password: str) -> None:
    """Create a worker's persistent session with its subscription, so messages queue while it is offline."""
    done = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    c.on_connect = lambda cl, *a: cl.subscribe(subscription, qos=1)
    c.on_subscribe = lambda *a: done.set()
    c.connect(s.mqtt_host, s.mqtt_port, clean_start=True, properties=_session_props(600))
    c.loop_start()
    assert done.wait(10), "subscription not acknowledged"
    c.disconnect()
    c.loop_stop()


def _end_session(s: Settings, client_id: str, user: str, password: str) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    c.connect(s.mqtt_host, s.mqtt_port, clean_start=True, properties=_session_props(0))
    c.loop_start()
    time.sleep(0.2)
    c.disconnect()
    c.loop_stop()


def _publish(s: Settings, payloads: list[tuple[str, bytes]]) -> float:
    """Publish every payload at QoS 1 and wait for all PUBACKs; returns messages/s."""
    from fleetwatch.credentials import service_credentials

    user, password = service_credentials(s, "simulator")
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:6]}",
                    protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    c.max_inflight_messages_set(1000)
    acked = [0]
    cond = threading.Condition()

    def on_publish(*_: object) -> None:
        with cond:
            acked[0] += 1
            cond.notify_all()

    c.on_publish = on_publish
    c.connect(s.mqtt_host, s.mqtt_port)
    c.loop_start()
    t0 = time.perf_counter()
    for i, (tid, payload) in enumerate(payloads):
        with cond:
            cond.wait_for(lambda i=i: i - acked[0] < 5000, 30)
        c.publish(f"tractors/{tid}/telemetry", payload, qos=1)
    with cond:
        cond.wait_for(lambda: acked[0] >= len(payloads), 120)
    rate = len(payloads) / (time.perf_counter() - t0)
    c.disconnect()
    c.loop_stop()
    return rate


class _Offsets:
    """Records in a topic (sum of end offsets), from one long-lived consumer so polling stays cheap."""

    def __init__(self, s: Settings, topic: str) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=s.bootstrap)
        self.tps = [TopicPartition(topic, p) for p in sorted(self.consumer.partitions_for_topic(topic) or ())]

    def count(self) -> int:
        return sum(self.consumer.end_offsets(self.tps).values())

    def close(self) -> None:
        self.consumer.close()


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU time of processes (all threads)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:  # gone: its time no longer counts
            continue
        total += t.user + t.system
    return total


def _services(s: Settings) -> dict[str, list[psutil.Process]]:
    """This stack's Mosquitto and Kafka processes (children of its supervisord)."""
    found: dict[str, list[psutil.Process]] = {"mosquitto": [], "kafka": []}
    supervisor = psutil.Process(int((s.run_dir / "supervisord.pid").read_text().strip()))
    for p in supervisor.children(recursive=True):
        try:
            if p.name() == "mosquitto":
                found["mosquitto"].append(p)
            elif "kafka" in " ".join(p.cmdline()):
                found["kafka"].append(p)
        except psutil.Error:
            continue
    return found


def run_case(base: Settings, kind: str, processes: int, payloads: list[tuple[str, bytes]],
             profile: Path | None = None) -> dict[str, Any]:
    """Preload, start ``processes`` workers of ``kind`` ("bridge" | "baseline"), time the drain into Kafka."""
    from fleetwatch.cli_ingest import bridge_config
    from fleetwatch.credentials import service_credentials
    from fleetwatch.pipeline import ensure_topics

    prefix = f"bb{uuid.uuid4().hex[:6]}-"
    env = {**os.environ, "FLEETWATCH_TOPIC_PREFIX": prefix}
    s = base.model_copy(update={"topic_prefix": prefix})
    ensure_topics(s)
    user, password = service_credentials(s, "bridge")
    configs = [bridge_config(s, i) for i in range(processes)]
    ids = [c.client_id if kind == "bridge" else f"{c.client_id}-baseline" for c in configs]
    for cid in ids:
        _prepare_session(s, cid, configs[0].subscription, user, password)
    me = psutil.Process()
    services = _services(s)
    cpu_pub, cpu_broker_in = _cpu_seconds([me]), _cpu_seconds(services["mosquitto"])
    publish_rate = _publish(s, payloads)
    cpu_pub = _cpu_seconds([me]) - cpu_pub  # the bench's own process is the publisher meanwhile
    cpu_broker_in = _cpu_seconds(services["mosquitto"]) - cpu_broker_in  # taking the messages in, queueing them
    offsets = _Offsets(s, s.topic("telemetry"))
    procs = []
    for i, cid in enumerate(ids):
        if kind == "bridge":
            cmd = [sys.executable, "-m", "fleetwatch.cli", "ingest", "run", "--worker-index", str(i)]
        else:
            cmd = [sys.executable, "-m", "bench.bench_bridge", "--baseline-worker", cid, "--client", kind[9:]]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL))
    spy = None
    if profile is not None:  # sample every thread of worker 0 (py-spy), not just the main thread
        time.sleep(2)  # past the imports
        spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(procs[0].pid),
                                "--format", "raw", "--threads", "--rate", "200", "-o", str(profile), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n = len(payloads)
    first: tuple[float, int] | None = None
    workers = [psutil.Process(p.pid) for p in procs]
    groups = {"bridge": workers, **services}
    cpu_first: dict[str, float] = {}
    last = time.perf_counter()
    deadline = time.monotonic() + 300
    stored = 0
    while stored < n and time.monotonic() < deadline:
        time.sleep(0.1)
        stored = offsets.count()
        now = time.perf_counter()
        if first is None and stored > 0:
            first = (now, stored)
            cpu_first = {g: _cpu_seconds(ps) for g, ps in groups.items()}
        last = now
    cpu = {g: _cpu_seconds(ps) - cpu_first[g] for g, ps in groups.items()} if first else dict.fromkeys(groups, 0.0)
    offsets.close()
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(timeout=60)
    for cid in ids:
        _end_session(s, cid, user, password)
    if first is None or stored < n:
        raise RuntimeError(f"{kind} × {processes}: only {stored}/{n} messages reached Kafka")
    seconds = max(last - first[0], 1e-3)
    drained = max(n - first[1], 1)
    msg_s = drained / seconds
    per_msg = {f"cpu_us_per_msg_{g}": 1e6 * c / drained for g, c in cpu.items()}
    per_msg["cpu_us_per_msg_mosquitto"] += 1e6 * cpu_broker_in / n  # in (preload) and out (drain)
    per_msg["cpu_us_per_msg_publisher"] = 1e6 * cpu_pub / n
    cpu_us = per_msg["cpu_us_per_msg_bridge"]
    return {"kind": kind, "processes": processes, "messages": n, "seconds": seconds, "msg_per_s": msg_s,
            "readings_per_s": msg_s * READINGS_PER_MESSAGE, "publish_msg_per_s": publish_rate,
            "cpu_us_per_msg": cpu_us, "msg_per_cpu_s": 1e6 / cpu_us if cpu_us else 0.0, **per_msg,
            "cpu_us_per_msg_all": sum(per_msg.values()), "load_avg_1m": os.getloadavg()[0]}


def baseline_worker(client_id: str, client: str) -> None:
    """The bare baseline: paho acks on receipt, raw bytes straight into a producer (no callbacks)."""
    from fleetwatch.cli_ingest import bridge_config
    from fleetwatch.credentials import service_credentials
    from fleetwatch.settings import get_settings

    s = get_settings()
    config = bridge_config(s, 0)
    user, password = service_credentials(s, "bridge")
    topic = s.topic("telemetry")
    if client == "confluent":
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": s.bootstrap, "acks": "all", "enable.idempotence": True,
                             "linger.ms": s.ingest_kafka_linger_ms, "partitioner": "murmur2_random"})
        def serve() -> None:
            while True:
                producer.poll(0.05)

        threading.Thread(target=serve, daemon=True).start()

        def send(key: bytes, value: bytes) -> None:
            while True:
                try:
                    return producer.produce(topic, value, key)
                except BufferError:
                    time.sleep(0.01)
    else:
        from kafka import KafkaProducer

        kp = KafkaProducer(bootstrap_servers=s.bootstrap, acks="all", enable_idempotence=True,
                           linger_ms=int(s.ingest_kafka_linger_ms),
                           batch_size=256 * 1024, metrics_enabled=False)
        producer = kp

        def send(key: bytes, value: bytes) -> None:
            kp.send(topic, key=key, value=value)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    c.on_message = lambda cl, u, m: send(m.topic.split("/")[1].encode(), m.payload)
    c.on_connect = lambda cl, *a: cl.subscribe(config.subscription, qos=1)
    c.connect(s.mqtt_host, s.mqtt_port, clean_start=False, properties=_session_props(600))
    c.loop_start()
    stop.wait()
    producer.flush()
    c.disconnect()
    c.loop_stop()


def print_profile(path: Path, top: int = 25) -> list[str]:
    """Where the bridge's threads spend their samples (py-spy raw stacks): own and inclusive share per function."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [re.sub(r" \((?:/[^)]*/)?([^/)]+)\)", r" (\1)", f) for f in stack.split(";")]
        total += n
        threads[frames[0]] += n
        own[frames[-1]] += n
        for f in set(frames[1:]):
            incl[f] += n
    rows = [f"thread {name}: {100 * n / total:.1f}%" for name, n in threads.most_common(6)]
    rows += [f"own {100 * n / total:5.1f}%  incl {100 * incl[f] / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    console.print("[bold]bridge worker profile (py-spy samples of every thread)[/bold]")
    for r in rows:
        console.print(r, markup=False, highlight=False)
    return rows


def main() -> None:
    """Run the three cases and report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=60_000)
    parser.add_argument("--tractors", type=int, default=200)
    parser.add_argument("--profile", action="store_true", help="also profile one bridge process (py-spy)")
    parser.add_argument("--baseline-worker", help=argparse.SUPPRESS)
    parser.add_argument("--client", default="confluent", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker:
        baseline_worker(args.baseline_worker, args.client)
        return
    payloads = list(fleet_messages(args.tractors, max(args.messages // args.tractors, 1)))
    results = []
    profile_rows: list[str] = []
    with bench_stack(["kafka", "mosquitto"]) as s:
        for kind, procs in (("baseline-confluent", 1), ("baseline-kafka-python", 1), ("bridge", 1), ("bridge", 2)):
            console.print(f"{kind} × {procs}: preloading {len(payloads):,} messages …")
            results.append(run_case(s, kind, procs, payloads))
        if args.profile:
            prof = RESULTS / "bridge-profile.txt"
            RESULTS.mkdir(parents=True, exist_ok=True)
            run_case(s, "bridge", 1, payloads, profile=prof)
            profile_rows = print_profile(prof)
    base = results[0]["msg_per_s"]
    one = results[2]["msg_per_s"]
    rows = [[f"{r['kind']} × {r['processes']}", r["messages"], r["seconds"], r["msg_per_s"], r["readings_per_s"],
             r["msg_per_s"] / base, r["msg_per_s"] / one if r["kind"] == "bridge" else "—", r["cpu_us_per_msg"],
             r["cpu_us_per_msg_mosquitto"], r["cpu_us_per_msg_kafka"], r["cpu_us_per_msg_publisher"],
             r["msg_per_cpu_s"], r["load_avg_1m"]] for r in results]
    report("bridge", "MQTT → Kafka bridge throughput (12-reading payloads, preloaded backlog)",
           ["case", "messages", "s", "msg/s", "readings/s", "÷ baseline", "÷ 1 bridge", "CPU µs/msg bridge",
            "µs mosquitto", "µs kafka", "µs publisher", "msg per bridge CPU-s", "load 1m"], rows,
           {"results": results, "target_msg_per_s_per_process": TARGET_MSG_S,
            "target_met": one >= TARGET_MSG_S, "scaling_1_to_2": results[3]["msg_per_s"] / one,
            "profile_top": profile_rows})
    b = results[2]
    cores = os.cpu_count() or 1
    console.print(f"one bridge process: {one:,.0f} msg/s ({'meets' if one >= TARGET_MSG_S else 'misses'} the "
                  f"{TARGET_MSG_S:,} msg/s target; {b['msg_per_cpu_s']:,.0f} msg per bridge CPU-second); "
                  f"1 → 2 processes: ×{results[3]['msg_per_s'] / one:.2f}")
    console.print(f"CPU per message, one bridge: bridge {b['cpu_us_per_msg']:.0f} µs + Mosquitto "
                  f"{b['cpu_us_per_msg_mosquitto']:.0f} µs + Kafka {b['cpu_us_per_msg_kafka']:.0f} µs + publisher "
                  f"{b['cpu_us_per_msg_publisher']:.0f} µs = {b['cpu_us_per_msg_all']:.0f} µs: at these costs "
                  f"{cores} cores carry at most {cores * 1e6 / b['cpu_us_per_msg_all']:,.0f} msg/s publisher → Kafka")


if __name__ == "__main__":
    main()

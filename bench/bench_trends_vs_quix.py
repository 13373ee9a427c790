"""Trend stage vs Quix Streams on the same Kafka topic: backlog throughput and live latency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
from confluent_kafka import ConsumerGroupState, KafkaException
from confluent_kafka.admin import AdminClient
from kafka import KafkaProducer

from bench.common import Stopwatch, bench_stack, create_topic, fleet_messages, fresh_database, report
from fleetwatch.db import upgrade
from fleetwatch.pipeline import end_offsets
from fleetwatch.settings import Settings
from functions import store
from functions.config import load_functions
from functions.db import make_engine, make_sessions
from functions.model import Context
from functions.worker import KafkaWorker, tune_gc
from trends import detect

PARAMS = {"window_s": 10, "lateness_s": 2, "history": 48, "min_windows": 3}


def _fill(s: Settings, topic: str, tractors: int, seconds: int) -> int:
    """Create ``topic`` and produce a fleet's telemetry into it as fast as Kafka takes it."""
    create_topic(s, topic, s.kafka_partitions)
    producer = KafkaProducer(bootstrap_servers=s.bootstrap, acks="all", linger_ms=5, batch_size=256 * 1024)
    sent = 0
    for key, value in fleet_messages(tractors, seconds):
        producer.send(topic, key=key.encode(), value=value)
        sent += 1
    producer.flush()
    producer.close()
    return sent


def wait_until_assigned(s: Settings, group: str, topic: str, timeout_s: float = 120.0) -> float:
    """Block until consumer group ``group`` is stable with every partition of ``topic`` assigned; seconds waited.

    The live phase starts its traffic only then, so its latencies are steady-state ones, not a consumer's start-up
    (database migrations, group join) that one implementation happens to spend before its first poll.
    """
    admin = AdminClient({"bootstrap.servers": s.bootstrap})
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            desc = admin.describe_consumer_groups([group], request_timeout=5)[group].result()
            owned = {tp.partition for m in desc.members for tp in m.assignment.topic_partitions if tp.topic == topic}
            if desc.state == ConsumerGroupState.STABLE and len(owned) == s.kafka_partitions:
                return time.monotonic() - started
        except KafkaException:
            pass  # the group does not exist yet
        time.sleep(0.2)
    raise RuntimeError(f"consumer group {group} did not get all of {topic} within {timeout_s:.0f} s")


def run_ours(s: Settings, topic: str, expected: int, url: str | None = None,
             ready: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the real trends-detect function (one worker) until it has consumed ``expected``; SQLite unless ``url``.

    ``ready(group)`` is called once the worker runs (the live phase waits there for the group's assignment).
    """
    url = url or f"sqlite:///{s.run_dir / f'bench-{topic}.db'}"
    upgrade(url)
    engine = make_engine(url)
    fn = load_functions(s.functions_path)["trends-detect"].model_copy(
        update={"source_topics": [topic], "consumer_group": f"ours-{topic}-{url.split(':', 1)[0]}", "params": PARAMS})
    worker = KafkaWorker(fn, s.bootstrap, make_sessions(engine))
    latencies: list[float] = []
    started: list[float] = []  # when the first batch reached the handler (Quix's clock starts at its first record)

    def probe(event: dict[str, Any], context: Context) -> None:
        if not started:
            started.append(time.perf_counter())
        detect.handler(event, context)
        now = time.time()
        for recs in event["records"].values():
            for r in recs:
                ts = r["json"]["samples"][0]["ts"]
                latencies.append(now - datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp())

    worker.invoker.handler = probe
    tune_gc(s.functions_gc_full_every)  # as `fleetwatch functions run` does in a worker process
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    if ready is not None:
        ready(worker.group)
    sessions = make_sessions(engine)
    while True:
        with sessions() as session:
            done = sum(store.load_offsets(session, worker.group, topic).values())
        if done >= expected:
            last = time.perf_counter()
            break
        time.sleep(0.05)
    worker.stop_event.set()
    thread.join(timeout=30)
    worker.close()
    engine.dispose()
    lat = np.asarray(latencies) if latencies else np.zeros(1)
    seconds = max(last - started[0], 1e-9)
    return {"messages": expected, "seconds": seconds, "messages_per_s": expected / seconds,
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p99_s": float(np.percentile(lat, 99)),
            "latency_max_s": float(lat.max())}


def run_quix(s: Settings, topic: str, expected: int, ready: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the Quix Streams baseline in its own process until it has consumed ``expected`` (``ready`` as ours)."""
    group = f"quix-{topic}-{time.time_ns()}"
    proc = subprocess.Popen([sys.executable, "-m", "bench.quix_trends", "--bootstrap", s.bootstrap, "--topic", topic,
                             "--group", group, "--messages", str(expected), "--window-s", str(PARAMS["window_s"]),
                             "--grace-s", str(PARAMS["lateness_s"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    if ready is not None:
        ready(group)
    out, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"quix baseline failed: {err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def main(tractors: int = 1000, seconds: int = 180, live_rate: float = 2000.0, live_seconds: int = 20) -> None:
    """Backlog throughput then live latency, ours (PostgreSQL and SQLite) vs Quix Streams, on the bench Kafka."""
    clock = Stopwatch()
    with bench_stack(["kafka", "postgres"]) as s:
        tag = int(time.time())
        backlog = f"bench-backlog-{tag}"
        n = _fill(s, backlog, tractors, seconds)
        pg_url = fresh_database(s, f"bench_quix_{tag}")
        ours = run_ours(s, backlog, n, pg_url)
        ours_sqlite = run_ours(s, backlog, n)
        quix = run_quix(s, backlog, n)
        live_rows: dict[str, dict[str, Any]] = {}
        runners: dict[str, Callable[[Settings, str, int, Callable[[str], None]], dict[str, Any]]] = {
            "ours": lambda st, t, k, ready: run_ours(st, t, k, fresh_database(st, f"bench_quix_live_{tag}"), ready),
            "quix": run_quix}
        for name, runner in runners.items() if live_seconds > 0 else ():
            topic = f"bench-live-{name}-{tag}"
            create_topic(s, topic, s.kafka_partitions)
            result: dict[str, Any] = {}
            assigned = threading.Event()

            def ready(group: str, t: str = topic, done: threading.Event = assigned, out: dict[str, Any] = result
                      ) -> None:
                out["ready_s"] = wait_until_assigned(s, group, t)
                done.set()

            consumer = threading.Thread(target=lambda r=runner, t=topic, out=result, rd=ready: out.update(
                r(s, t, int(live_rate * live_seconds), ready=rd)))
            consumer.start()
            if not assigned.wait(180):
                raise RuntimeError(f"{name}: consumer never got the live topic's partitions")
            time.sleep(1)  # positioned at the (empty) partitions' ends
            _fill_existing(s, topic, int(live_rate), live_seconds, live_rate)
            consumer.join()
            live_rows[name] = result
        assert sum(end_offsets(s, backlog).values()) == n
    readings = 12
    rows = [["backlog", label, r["messages_per_s"], r["messages_per_s"] * readings, "—", "—"]
            for label, r in (("fleetwatch trends-detect, PostgreSQL", ours),
                             ("fleetwatch trends-detect, SQLite", ours_sqlite), ("Quix Streams", quix))]
    for name, label in (("ours", "fleetwatch trends-detect, PostgreSQL"), ("quix", "Quix Streams")):
        if name in live_rows:
            live = live_rows[name]
            rows.append(["live", label, live["messages_per_s"], live_rate * readings, live["latency_p50_s"],
                         live["latency_p99_s"]])
    ratio = ours["messages_per_s"] / quix["messages_per_s"]
    ratio_sqlite = ours_sqlite["messages_per_s"] / quix["messages_per_s"]
    report("trends_vs_quix", f"Trend stage vs Quix Streams ({tractors} tractors × {seconds} s backlog; ours ÷ Quix "
           f"throughput = {ratio:.2f}× on PostgreSQL, {ratio_sqlite:.2f}× on SQLite; target ≥ 1.5×)",
           ["phase", "implementation", "messages/s", "readings/s", "latency p50 s", "latency p99 s"], rows,
           {"ratio_ours_over_quix": ratio, "ratio_sqlite_over_quix": ratio_sqlite, "target_ratio": 1.5,
            "targets": [{"target": "trend stage ≥ 1.5× Quix Streams' throughput on the same topic (PostgreSQL, "
                                   "the production database)",
                         "measured": f"{ratio:.2f}× ({ours['messages_per_s']:,.0f} vs {quix['messages_per_s']:,.0f} "
                                     f"msg/s; SQLite {ratio_sqlite:.2f}×)", "met": ratio >= 1.5}],
            "ours": ours, "ours_sqlite": ours_sqlite, "quix": quix, "live": live_rows,
            "params": PARAMS, "wall_s": clock.seconds(), "load_average_1m": os.getloadavg()[0]})


def _fill_existing(s: Settings, topic: str, tractors: int, seconds: int, rate: float) -> int:
    """Produce live traffic into an existing topic."""
    producer = KafkaProducer(bootstrap_servers=s.bootstrap, acks="all", linger_ms=5)
    sent = 0
    t0 = time.perf_counter()
    for key, value in fleet_messages(tractors, seconds, start=datetime.now(UTC).replace(microsecond=0)):
        producer.send(topic, key=key.encode(), value=value)
        sent += 1
        if sent % 100 == 0:
            ahead = t0 + sent / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
    producer.flush()
    producer.close()
    return sent


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tractors", type=int, default=1000)
    ap.add_argument("--seconds", type=int, default=180)
    ap.add_argument("--live-rate", type=float, default=2000.0)
    ap.add_argument("--live-seconds", type=int, default=20, help="0 skips the live-latency phase")
    a = ap.parse_args()
    main(a.tractors, a.seconds, a.live_rate, a.live_seconds)

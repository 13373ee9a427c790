"""Functions runtime overhead: records/s through a no-op handler next to bare kafka-python and librdkafka loops.

All cases read the same pre-filled topic (4 partitions, telemetry-sized JSON values) in the same run:

- **bare kafka-python loop** — the least a consumer can do: ``KafkaConsumer.poll(max_records=500)`` in a loop, no
  commits (the issue's baseline);
- **bare confluent-kafka loop** — the same with librdkafka, the client the runtime itself uses:
  ``Consumer.consume(500)`` in a loop, no commits;
- **runtime, 1 worker** — ``KafkaWorker`` + ``Invoker`` with ``functions.examples:noop`` (batch 500): the Lambda
  event (records grouped by topic-partition; base64 key/value and decoded JSON are built only when read, which a
  no-op handler never does), offsets committed to Kafka after
  every batch, an invocation log row per batch;
- **runtime, 1 worker, exactly-once** — the same with offsets stored in PostgreSQL in the handler's transaction;
- **runtime, 2 workers** — ``fleetwatch functions run NAME --workers 2`` (two processes, one group), rate over
  the time both were invoking (from their invocation log rows).

CPU µs/record is the process's CPU time (all threads) over the same span: less sensitive to a loaded machine.
Rates are records over the time from the first record received to the last one processed; the bare loops and
the 1-worker runtime run in interleaved rounds (median reported) because the machine is shared. Each ratio is a
bare loop's rate over the runtime's: the target (≤ 1.2× for one worker) is against kafka-python; the ratio
against confluent-kafka shows what the runtime costs over its own client. kafka-python verifies CRC32C of every
record batch: with the ``crc32c`` C package installed that is cheap, without it it spends most of its time there.

    python -m bench.bench_runtime [--records 100000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from sqlalchemy import func, select

from bench.common import bench_settings, bench_stack, console, create_topic, fleet_messages, report
from fleetwatch.db import upgrade
from fleetwatch.settings import Settings
from functions import store
from functions.config import FunctionConfig
from functions.db import make_engine, make_sessions
from functions.model import Context
from functions.worker import KafkaWorker

BATCH = 500
TARGET_RATIO = 1.2
KP, CK, ONE = "bare kafka-python loop", "bare confluent-kafka loop", "runtime, 1 worker"


def fill_topic(s: Settings, topic: str, records: int, create: bool = True) -> int:
    """Write ``records`` telemetry messages (creating a 4-partition topic); returns the value size in bytes."""
    if create:
        create_topic(s, topic)
    producer = KafkaProducer(bootstrap_servers=s.bootstrap, acks=1, linger_ms=20, batch_size=256 * 1024)
    sample = list(fleet_messages(100, 20))  # 2,000 distinct payloads, reused: the handler does not look
    for i in range(records):
        key, value = sample[i % len(sample)]
        producer.send(topic, value, key=key.encode())
    producer.flush()
    producer.close()
    return len(sample[0][1])


def bare_loop(s: Settings, topic: str, records: int) -> tuple[float, float]:
    """Records/s and CPU µs per record of a bare kafka-python loop reading the whole topic."""
    consumer = KafkaConsumer(topic, bootstrap_servers=s.bootstrap, group_id=f"bare-{uuid.uuid4().hex[:6]}",
                             auto_offset_reset="earliest", enable_auto_commit=False, max_poll_records=BATCH,
                             fetch_max_wait_ms=100)
    seen, first, cpu = 0, None, 0.0
    try:
        while seen < records:
            polled = consumer.poll(timeout_ms=1000, max_records=BATCH)
            for recs in polled.values():
                if first is None:
                    first, cpu = time.perf_counter(), time.process_time()
                seen += len(recs)
        return seen / (time.perf_counter() - (first or time.perf_counter())), _cpu_us(cpu, seen)
    finally:
        consumer.close()


def bare_confluent(s: Settings, topic: str, records: int) -> tuple[float, float]:
    """Records/s and CPU µs per record of a bare librdkafka (confluent-kafka) loop reading the whole topic."""
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": s.bootstrap, "group.id": f"bare-ck-{uuid.uuid4().hex[:6]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False, "fetch.wait.max.ms": 100})
    consumer.subscribe([topic])
    seen, first, cpu = 0, None, 0.0
    try:
        while seen < records:
            messages = consumer.consume(BATCH, 1.0)
            if messages and first is None:
                first, cpu = time.perf_counter(), time.process_time()
            seen += sum(1 for m in messages if m.error() is None)
        return seen / (time.perf_counter() - (first or time.perf_counter())), _cpu_us(cpu, seen)
    finally:
        consumer.close()


def _cpu_us(since: float, records: int) -> float:
    """CPU time of this process (every thread, librdkafka's included) per record since ``since``, in µs."""
    return (time.process_time() - since) / max(records, 1) * 1e6


def runtime_one(s: Settings, topic: str, records: int, db_url: str | None) -> tuple[float, float]:
    """Records/s and CPU µs per record of one in-process worker over the whole topic (exactly-once with ``db_url``)."""
    fn = FunctionConfig(name=f"bench-{uuid.uuid4().hex[:6]}", handler="functions.examples:noop",
                        source_topics=[topic], batch_size=BATCH, maximum_batching_window_s=0.0,
                        transactional=db_url is not None)
    engine = make_engine(db_url or f"sqlite:///{s.run_dir / 'bench-runtime.db'}")
    store.metadata.create_all(engine)
    seen = [0]
    first: list[float] = []
    cpu: list[float] = []

    def counting_noop(event: dict[str, Any], context: Context) -> None:
        if not first:
            first.append(time.perf_counter())
            cpu.append(time.process_time())
        seen[0] += sum(len(v) for v in event["records"].values())

    worker = KafkaWorker(fn, s.bootstrap, make_sessions(engine), handler=counting_noop)
    deadline = time.monotonic() + 300
    try:
        worker.run(until=lambda: seen[0] >= records or time.monotonic() > deadline)
        if seen[0] < records:
            raise RuntimeError(f"runtime read only {seen[0]} of {records} records in 300 s")
        return seen[0] / (time.perf_counter() - first[0]), _cpu_us(cpu[0], seen[0])
    finally:
        worker.close()
        engine.dispose()


def runtime_pool(s: Settings, topic: str, records: int, workers: int, db_url: str) -> float:
    """Records/s of ``fleetwatch functions run --workers N`` (processes) while all N invoke, from their log rows."""
    name = f"bench-pool-{uuid.uuid4().hex[:6]}"
    # The first member would drain the backlog alone before the second one joined: each waits in its first
    # invocation until start_at, by which time both are in the group; the rate counts only while both invoke.
    spec = (f'[[function]]\nname = "{name}"\nhandler = "functions.examples:noop_from"\nsource_topics = ["{topic}"]\n'
            f"batch_size = {BATCH}\nmaximum_batching_window_s = 0.0\ntransactional = false\ntimeout_s = 120\n"
            f"[function.params]\nstart_at = {time.time() + 15}\n")
    path = s.run_dir / f"{name}.toml"
    path.write_text(spec)
    env = os.environ | {"FLEETWATCH_FUNCTIONS_FILE": str(path), "FLEETWATCH_DATABASE_URL": db_url,
                        "FLEETWATCH_TOPIC_PREFIX": ""}
    engine = make_engine(db_url)
    inv = store.fn_invocations
    proc = subprocess.Popen([str(Path(sys.executable).with_name("fleetwatch")), "functions", "run", name,
                             "--workers", str(workers)], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        done = 0
        while done < records and time.monotonic() < deadline:
            time.sleep(0.5)
            with engine.connect() as conn:
                done = conn.execute(select(func.coalesce(func.sum(inv.c.batch_size), 0))
                                    .where(inv.c.function == name, inv.c.outcome == "ok")).scalar_one()
        with engine.connect() as conn:
            rows = list(conn.execute(select(inv.c.started_at, inv.c.duration_ms, inv.c.batch_size, inv.c.worker)
                                     .where(inv.c.function == name, inv.c.outcome == "ok")))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        engine.dispose()
    # Steady state: while every worker was invoking (the first one starts alone, then the group rebalances).
    spans: dict[str, tuple[float, float]] = {}
    for r in rows:
        t0, t1 = r.started_at.timestamp(), r.started_at.timestamp() + r.duration_ms / 1000
        lo, hi = spans.get(r.worker, (t0, t1))
        spans[r.worker] = (min(lo, t0), max(hi, t1))
    start, end = max(lo for lo, _ in spans.values()), min(hi for _, hi in spans.values())
    inside = sum(r.batch_size for r in rows if start <= r.started_at.timestamp() <= end)
    if len(spans) < workers or end - start < 1.0:
        raise RuntimeError(f"only {len(spans)} of {workers} workers overlapped ({end - start:.1f} s)")
    return inside / (end - start)


def isolated(case: str, topic: str, records: int, db_url: str | None = None) -> tuple[float, float]:
    """Run one case in a fresh process (one Kafka client per process, like a real worker); retry once."""
    cmd = [sys.executable, "-m", "bench.bench_runtime", "--case", case, "--topic", topic, "--records", str(records)]
    if db_url:
        cmd += ["--db-url", db_url]
    for attempt in (1, 2):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=os.environ.copy())
        except subprocess.TimeoutExpired:
            console.print(f"[yellow]{case}: no result within 240 s (attempt {attempt})[/yellow]")
            continue
        if out.returncode == 0:
            rate, cpu = out.stdout.strip().splitlines()[-1].split()
            return float(rate), float(cpu)
        console.print(f"[yellow]{case} failed (attempt {attempt}): {out.stderr[-500:]}[/yellow]")
    raise RuntimeError(f"case {case} failed twice")


def main() -> None:
    """Run every case on one topic and report the rates and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of bare loop and 1 worker")
    parser.add_argument("--case", choices=["bare", "bare-confluent", "one"], help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--db-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # a child process running one case on the already running bench stack
        s = bench_settings()
        if args.case == "bare":
            rate = bare_loop(s, args.topic, args.records)
        elif args.case == "bare-confluent":
            rate = bare_confluent(s, args.topic, args.records)
        else:
            rate = runtime_one(s, args.topic, args.records, args.db_url)
        print(*rate)
        return
    with bench_stack(["kafka", "postgres"]) as s:
        db_url = s.pg_url
        upgrade(db_url)
        topic = f"bench-runtime-{uuid.uuid4().hex[:6]}"
        with console.status(f"writing {args.records:,} records to {topic}"):
            size = fill_topic(s, topic, args.records)
        cases: dict[str, float] = {}
        rounds: dict[str, list[tuple[float, float]]] = {KP: [], CK: [], ONE: []}
        loads: list[float] = []
        for i in range(args.rounds):  # interleaved, so load from other processes hits all alike
            loads.append(os.getloadavg()[0])
            with console.status(f"round {i + 1}/{args.rounds}: bare kafka-python loop"):
                rounds[KP].append(isolated("bare", topic, args.records))
            with console.status(f"round {i + 1}/{args.rounds}: bare confluent-kafka loop"):
                rounds[CK].append(isolated("bare-confluent", topic, args.records))
            with console.status(f"round {i + 1}/{args.rounds}: runtime, 1 worker"):
                rounds[ONE].append(isolated("one", topic, args.records))
        cases = {name: statistics.median(r for r, _ in got) for name, got in rounds.items()}
        cpu = {name: statistics.median(c for _, c in got) for name, got in rounds.items()}
        with console.status("runtime, 1 worker, exactly-once (PostgreSQL offsets)"):
            pg = "runtime, 1 worker, offsets in PostgreSQL"
            cases[pg], cpu[pg] = isolated("one", topic, args.records, db_url)
        with console.status("runtime, 2 worker processes"):
            # A longer backlog, so both members work together long after the second one joined.
            fill_topic(s, topic, 2 * args.records, create=False)
            cases["runtime, 2 workers (processes)"] = runtime_pool(s, topic, 3 * args.records, 2, db_url)
        loads.append(os.getloadavg()[0])
    kp, ck = cases[KP], cases[CK]
    rows = [[name, rate, kp / rate, ck / rate, cpu[name] if name in cpu else "—"] for name, rate in cases.items()]
    ratio, ratio_ck = kp / cases[ONE], ck / cases[ONE]
    report("runtime", f"Functions runtime: {args.records:,} records of {size} B, no-op handler, batch {BATCH}",
           ["case", "records/s", "kafka-python loop ÷ case", "confluent-kafka loop ÷ case", "CPU µs/record"], rows,
           {"records": args.records, "value_bytes": size, "batch_size": BATCH, "target_ratio": TARGET_RATIO,
            "overhead_ratio_1_worker": ratio, "overhead_ratio_1_worker_vs_confluent": ratio_ck, "rates": cases,
            "cpu_us_per_record": cpu, "rounds": rounds, "load_average_1min": loads})
    verdict = "[green]within[/green]" if ratio <= TARGET_RATIO else "[red]over[/red]"
    console.print(f"runtime, 1 worker: {ratio:.2f}× the bare kafka-python loop ({verdict} the {TARGET_RATIO}× target), "
                  f"{ratio_ck:.2f}× the bare confluent-kafka loop; load average {min(loads):.1f}–{max(loads):.1f}")
    print(json.dumps({"overhead_ratio_1_worker": round(ratio, 3), "overhead_ratio_1_worker_vs_confluent":
                      round(ratio_ck, 3)}))


if __name__ == "__main__":
    main()

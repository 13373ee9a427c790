"""Functions runtime overhead: records/s through a no-op handler next to a bare kafka-python consumer loop.

All cases read the same pre-filled topic (4 partitions, telemetry-sized JSON values) in the same run:

- **bare loop** — the least a consumer can do: ``KafkaConsumer.poll(max_records=500)`` in a loop, no commits;
- **runtime, 1 worker** — ``KafkaWorker`` + ``Invoker`` with ``functions.examples:noop`` (batch 500): the Lambda
  event (records grouped by topic-partition, base64 key/value, decoded JSON), offsets committed to Kafka after
  every batch, an invocation log row per batch;
- **runtime, 1 worker, exactly-once** — the same with offsets stored in PostgreSQL in the handler's transaction;
- **runtime, 2 workers** — ``fleetwatch functions run bench-noop --workers 2`` (two processes, one group).

Rates are records over the time from the first record received to the last one processed; the bare loop and
the 1-worker runtime run in interleaved rounds (median reported) because the machine is shared. The ratio is
the bare loop's rate over the runtime's (target ≤ 1.2× for one worker). kafka-python verifies CRC32C of every
record batch: with the ``crc32c`` C package installed that is cheap, without it both sides spend most of
their time there.

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

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from sqlalchemy import func, select

from bench.common import bench_stack, console, fleet_messages, report
from fleetwatch.db import upgrade
from fleetwatch.settings import Settings
from functions import store
from functions.config import FunctionConfig
from functions.db import make_engine, make_sessions
from functions.model import Context
from functions.worker import KafkaWorker

BATCH = 500
TARGET_RATIO = 1.2


def fill_topic(s: Settings, topic: str, records: int) -> int:
    """Create a 4-partition topic and write ``records`` telemetry messages; returns the value size in bytes."""
    admin = KafkaAdminClient(bootstrap_servers=s.bootstrap)
    try:
        admin.create_topics([NewTopic(topic, 4, 1)])
    finally:
        admin.close()
    producer = KafkaProducer(bootstrap_servers=s.bootstrap, acks=1, linger_ms=20, batch_size=256 * 1024)
    size = 0
    tractors = 100
    for key, value in fleet_messages(tractors, records // tractors + 1):
        producer.send(topic, value, key=key.encode())
        size = len(value)
        records -= 1
        if records == 0:
            break
    producer.flush()
    producer.close()
    return size


def bare_loop(s: Settings, topic: str, records: int) -> float:
    """Records/s of a bare consumer loop reading the whole topic."""
    consumer = KafkaConsumer(topic, bootstrap_servers=s.bootstrap, group_id=f"bare-{uuid.uuid4().hex[:6]}",
                             auto_offset_reset="earliest", enable_auto_commit=False, max_poll_records=BATCH,
                             fetch_max_wait_ms=100)
    seen, first = 0, None
    try:
        while seen < records:
            polled = consumer.poll(timeout_ms=1000, max_records=BATCH)
            for recs in polled.values():
                if first is None:
                    first = time.perf_counter()
                seen += len(recs)
        return seen / (time.perf_counter() - (first or time.perf_counter()))
    finally:
        consumer.close()


def runtime_one(s: Settings, topic: str, records: int, db_url: str | None) -> float:
    """Records/s of one in-process worker over the whole topic (exactly-once when ``db_url`` is given)."""
    fn = FunctionConfig(name=f"bench-{uuid.uuid4().hex[:6]}", handler="functions.examples:noop",
                        source_topics=[topic], batch_size=BATCH, maximum_batching_window_s=0.0,
                        transactional=db_url is not None)
    engine = make_engine(db_url or f"sqlite:///{s.run_dir / 'bench-runtime.db'}")
    store.metadata.create_all(engine)
    seen = [0]
    first: list[float] = []

    def counting_noop(event: dict[str, Any], context: Context) -> None:
        if not first:
            first.append(time.perf_counter())
        seen[0] += sum(len(v) for v in event["records"].values())

    worker = KafkaWorker(fn, s.bootstrap, make_sessions(engine), handler=counting_noop)
    deadline = time.monotonic() + 300
    try:
        worker.run(until=lambda: seen[0] >= records or time.monotonic() > deadline)
        if seen[0] < records:
            raise RuntimeError(f"runtime read only {seen[0]} of {records} records in 300 s")
        return seen[0] / (time.perf_counter() - first[0])
    finally:
        worker.close()
        engine.dispose()


def runtime_pool(s: Settings, topic: str, records: int, workers: int, db_url: str) -> float:
    """Records/s of ``fleetwatch functions run --workers N`` (processes), from its invocation log rows."""
    name = f"bench-pool-{uuid.uuid4().hex[:6]}"
    spec = (f'[[function]]\nname = "{name}"\nhandler = "functions.examples:noop"\nsource_topics = ["{topic}"]\n'
            f"batch_size = {BATCH}\nmaximum_batching_window_s = 0.0\ntransactional = false\n")
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
            rows = list(conn.execute(select(inv.c.started_at, inv.c.duration_ms)
                                     .where(inv.c.function == name, inv.c.outcome == "ok")))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        engine.dispose()
    start = min(r.started_at for r in rows).timestamp()
    end = max(r.started_at.timestamp() + r.duration_ms / 1000 for r in rows)
    return done / (end - start)


def main() -> None:
    """Run every case on one topic and report the rates and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of bare loop and 1 worker")
    args = parser.parse_args()
    with bench_stack(["kafka", "postgres"]) as s:
        db_url = s.pg_url
        upgrade(db_url)
        topic = f"bench-runtime-{uuid.uuid4().hex[:6]}"
        with console.status(f"writing {args.records:,} records to {topic}"):
            size = fill_topic(s, topic, args.records)
        cases: dict[str, float] = {}
        rounds: dict[str, list[float]] = {"bare loop": [], "runtime, 1 worker": []}
        for i in range(args.rounds):  # interleaved, so load from other processes hits both alike
            with console.status(f"round {i + 1}/{args.rounds}: bare kafka-python loop"):
                rounds["bare loop"].append(bare_loop(s, topic, args.records))
            with console.status(f"round {i + 1}/{args.rounds}: runtime, 1 worker"):
                rounds["runtime, 1 worker"].append(runtime_one(s, topic, args.records, None))
        cases = {name: statistics.median(rates) for name, rates in rounds.items()}
        with console.status("runtime, 1 worker, exactly-once (PostgreSQL offsets)"):
            cases["runtime, 1 worker, offsets in PostgreSQL"] = runtime_one(s, topic, args.records, db_url)
        with console.status("runtime, 2 worker processes"):
            cases["runtime, 2 workers (processes)"] = runtime_pool(s, topic, args.records, 2, db_url)
    bare = cases["bare loop"]
    rows = [[name, rate, bare / rate] for name, rate in cases.items()]
    ratio = bare / cases["runtime, 1 worker"]
    report("runtime", f"Functions runtime: {args.records:,} records of {size} B, no-op handler, batch {BATCH}",
           ["case", "records/s", "bare loop ÷ case"], rows,
           {"records": args.records, "value_bytes": size, "batch_size": BATCH, "target_ratio": TARGET_RATIO,
            "overhead_ratio_1_worker": ratio, "rates": cases, "rounds": rounds})
    verdict = "[green]within[/green]" if ratio <= TARGET_RATIO else "[red]over[/red]"
    console.print(f"runtime overhead, 1 worker: {ratio:.2f}× the bare loop ({verdict} the {TARGET_RATIO}× target)")
    print(json.dumps({"overhead_ratio_1_worker": round(ratio, 3)}))


if __name__ == "__main__":
    main()

"""Trend detection throughput: readings/s through the compute path and through the full function on real Kafka.

Two telemetry sets from the shipped ``mixed-wear`` scenario (13 readings per sample):

- **1 Hz** (the headline, the deployment's rate): ``--hz-tractors`` tractors sampled every second for ``--hz-hours``
  hours of machine time, so each 1 h window holds ~3,600 samples and the first windows close;
- **coarse replay**: ``--tractors`` tractors × ``--days`` days at the scenario's own period (900 s: about one
  sample per window, so the per-window close path weighs far more than it does at 1 Hz).

Cases:

- **compute path** — ``trends.detect.flatten`` + ``Detector.process`` on batches of parsed Kafka records with the
  state in memory: what one worker process spends on the maths (no database, no broker);
- **naive per-record Python** — the baseline measured in the same run: the same hourly windows and Theil–Sen
  trends written the obvious way (a dict per tractor × signal × window, one Python step per reading);
- **full function on Kafka** — a ``KafkaWorker`` running ``trends.detect:handler`` exactly-once (offsets, windows,
  part health and state in PostgreSQL, one transaction per batch) over a pre-filled 4-partition topic holding the
  first ``--kafka-records`` records of the 1 Hz set.

The simulated sets are cached in ``bench/results/`` (the simulator needs minutes for the 1 Hz set).

    python -m bench.bench_trends [--hz-tractors 200] [--hz-hours 1.5] [--tractors 200] [--days 12]
                                 [--kafka-records 20000] [--no-kafka]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import statistics
import time
import uuid
import zlib
from datetime import datetime
from typing import Any

from bench.common import RESULTS, bench_stack, console, create_topic, report
from fleetwatch.db import CATALOG, load_catalog
from simulators.scenario import build, load
from trends.detect import Detector, Params, Part, flatten

TARGET = 200_000  # readings/s per worker process


def simulated_records(tractors: int, days: float, seed: int = 7, period_s: float | None = None
                      ) -> list[dict[str, Any]]:
    """Kafka-event records (decoded JSON) of a mixed-wear fleet, in publishing order (cached on disk)."""
    cache = RESULTS / f"trends-records-{tractors}-{days:g}-{seed}-{period_s or 'scenario'}.pickle"
    if cache.exists():
        with cache.open("rb") as f:
            return pickle.load(f)  # noqa: S301 - our own cache file
    fleet, run_days, period = build(load("mixed-wear"), tractors=tractors, days=days, seed=seed,
                                    period_s=period_s, catalog=load_catalog(CATALOG))
    out: list[dict[str, Any]] = []
    for _, msgs in fleet.run(run_days, period):
        for tid, payload in msgs:
            out.append({"topic": "telemetry", "partition": zlib.crc32(tid.encode()) % 4, "json": json.loads(payload)})
    RESULTS.mkdir(parents=True, exist_ok=True)
    with cache.open("wb") as f:
        pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)
    return out


def catalog_parts() -> list[Part]:
    """Catalog parts as the detector sees them (what ``load_parts`` reads from the parts table)."""
    class Row:
        def __init__(self, d: dict[str, Any]) -> None:
            self.__dict__.update(d)
            self.extra = dict(d)  # Part.from_row reads the detector keys from extra, as from parts.extra

    return [Part.from_row(Row(r)) for r in load_catalog(CATALOG)]


def count_readings(records: list[dict[str, Any]]) -> int:
    """Readings in a list of records."""
    return sum(len(s["readings"]) for r in records for s in r["json"]["samples"])


def compute_path(records: list[dict[str, Any]], batch: int) -> float:
    """Seconds for flatten + Detector.process over every batch, state in memory."""
    det = Detector(catalog_parts(), Params())
    states: dict[str, Any] = {}
    partitions: dict[str, Any] = {}
    started = time.perf_counter()
    for a in range(0, len(records), batch):
        det.process(flatten(records[a:a + batch]), states, partitions, states.get)
    return time.perf_counter() - started


def _theil_sen(t: list[float], y: list[float]) -> float:
    slopes = [(y[j] - y[i]) / (t[j] - t[i]) for i in range(len(t)) for j in range(i + 1, len(t)) if t[j] > t[i]]
    return statistics.median(slopes) if slopes else 0.0


def naive(records: list[dict[str, Any]], history: int = 24) -> float:
    """Seconds for the per-record baseline: dict windows per reading, Theil–Sen per closed window."""
    started = time.perf_counter()
    open_w: dict[tuple[str, str], dict[int, list[float]]] = {}
    hist: dict[tuple[str, str], list[tuple[float, float]]] = {}
    wm: dict[str, float] = {}
    for r in records:
        msg = r["json"]
        tid = msg["tractor_id"]
        for sample in msg["samples"]:
            ts = datetime.fromisoformat(sample["ts"].replace("Z", "+00:00")).timestamp()
            wm[tid] = max(wm.get(tid, 0.0), ts)
            w = int(ts // 3600) * 3600
            for sig, v in sample["readings"].items():
                acc = open_w.setdefault((tid, sig), {}).setdefault(w, [0, 0.0, 0.0, math.inf, -math.inf])
                acc[0] += 1
                acc[1] += v
                acc[2] += v * v
                acc[3] = min(acc[3], v)
                acc[4] = max(acc[4], v)
            for sig in sample["readings"]:
                windows = open_w[(tid, sig)]
                for start in [k for k in windows if k + 3600 + 900 <= wm[tid]]:
                    n, s, _, _, _ = windows.pop(start)
                    h = hist.setdefault((tid, sig), [])
                    h.append(((start + 1800) / 3600, s / n))
                    del h[:-history]
                    if len(h) >= 6:
                        _theil_sen([p[0] for p in h], [p[1] for p in h])
    return time.perf_counter() - started


def full_function(records: list[dict[str, Any]], batch: int) -> tuple[float, int]:
    """Readings/s of trends.detect:handler in a KafkaWorker (PostgreSQL, exactly-once) over a filled topic."""
    from kafka import KafkaProducer

    from fleetwatch.db import upgrade
    from functions.config import FunctionConfig, load_functions
    from functions.db import make_engine, make_sessions
    from functions.model import Context
    from functions.worker import KafkaWorker
    from trends.detect import handler

    with bench_stack(["kafka", "postgres"]) as s:
        upgrade(s.pg_url)
        topic = f"bench-trends-{uuid.uuid4().hex[:6]}"
        create_topic(s, topic)
        producer = KafkaProducer(bootstrap_servers=s.bootstrap, acks=1, linger_ms=20, batch_size=256 * 1024)
        for r in records:
            msg = r["json"]
            producer.send(topic, json.dumps(msg, separators=(",", ":")).encode(), key=msg["tractor_id"].encode())
        producer.flush()
        producer.close()
        params = load_functions(s.functions_path)["trends-detect"].params
        fn = FunctionConfig(name=f"bench-trends-{uuid.uuid4().hex[:6]}", handler="trends.detect:handler",
                            source_topics=[topic], batch_size=batch, maximum_batching_window_s=0.0,
                            transactional=True, params=params)
        engine = make_engine(s.pg_url)
        seen = [0]
        first: list[float] = []

        def counting(event: dict[str, Any], context: Context) -> None:
            if not first:
                first.append(time.perf_counter())
            handler(event, context)
            seen[0] += sum(len(v) for v in event["records"].values())

        worker = KafkaWorker(fn, s.bootstrap, make_sessions(engine), handler=counting)
        try:
            worker.run(until=lambda: seen[0] >= len(records))
            seconds = time.perf_counter() - first[0]
        finally:
            worker.close()
            engine.dispose()
    return seconds, seen[0]


def main() -> None:
    """Run the cases and report readings/s and the ratio to the naive baseline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hz-tractors", type=int, default=200, help="tractors of the 1 Hz set")
    parser.add_argument("--hz-hours", type=float, default=1.5, help="hours of machine time of the 1 Hz set")
    parser.add_argument("--tractors", type=int, default=200, help="tractors of the coarse replay")
    parser.add_argument("--days", type=float, default=12.0, help="days of the coarse replay")
    parser.add_argument("--batch", type=int, default=2000, help="records per compute-path batch")
    parser.add_argument("--kafka-records", type=int, default=20_000)
    parser.add_argument("--no-kafka", action="store_true", help="skip the full-function case")
    args = parser.parse_args()
    sets: dict[str, list[dict[str, Any]]] = {}
    with console.status(f"simulating {args.hz_tractors} tractors × {args.hz_hours:g} h at 1 Hz"):
        sets["1 Hz"] = simulated_records(args.hz_tractors, args.hz_hours / 24, period_s=1.0)
    with console.status(f"simulating {args.tractors} tractors × {args.days:g} days (coarse)"):
        sets["coarse"] = simulated_records(args.tractors, args.days)
    rows: list[list[Any]] = []
    extra: dict[str, Any] = {"load_average_1m_start": os.getloadavg()[0], "target_readings_per_s": TARGET,
                             "batch": args.batch, "sets": {}}
    headline = 0.0
    for name, records in sets.items():
        readings = count_readings(records)
        with console.status(f"compute path, {name}"):
            t_vec = min(compute_path(records, args.batch) for _ in range(2))
        with console.status(f"naive per-record Python baseline, {name}"):
            t_naive = naive(records)
        vec, base = readings / t_vec, readings / t_naive
        headline = headline or vec
        label = (f"{args.hz_tractors} tractors × {args.hz_hours:g} h at 1 Hz" if name == "1 Hz"
                 else f"{args.tractors} tractors × {args.days:g} d, 900 s period")
        rows.append([f"compute path, {name} ({label}; flatten + Detector.process, batch {args.batch})",
                     readings, vec, vec / base])
        rows.append([f"naive per-record Python, {name} (baseline)", readings, base, 1.0])
        extra["sets"][name] = {"records": len(records), "readings": readings, "compute_readings_per_s": vec,
                               "naive_readings_per_s": base, "ratio_vs_naive": vec / base}
    extra["compute_readings_per_s"] = headline
    if not args.no_kafka:
        subset = sets["1 Hz"][:args.kafka_records]
        with console.status(f"full function on Kafka + PostgreSQL ({len(subset):,} records)"):
            seconds, _ = full_function(subset, 500)
        n = count_readings(subset)
        base = extra["sets"]["1 Hz"]["naive_readings_per_s"]
        rows.append([f"full function on Kafka, 1 worker, PostgreSQL exactly-once (batch 500, first {len(subset):,} "
                     "records of the 1 Hz set)", n, n / seconds, n / seconds / base])
        extra["full_function_readings_per_s"] = n / seconds
        extra["full_function_records_per_s"] = len(subset) / seconds
    extra["load_average_1m_end"] = os.getloadavg()[0]
    report("trends", "Trend detection, readings/s (13 readings per sample)",
           ["case", "readings", "readings/s", "× naive"], rows, extra)
    verdict = "[green]meets[/green]" if headline >= TARGET else "[red]misses[/red]"
    console.print(f"compute path at 1 Hz {headline:,.0f} readings/s per process: {verdict} the {TARGET:,} target "
                  f"(load average {extra['load_average_1m_start']:.1f} → {extra['load_average_1m_end']:.1f})")


if __name__ == "__main__":
    main()

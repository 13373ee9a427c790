"""Shared benchmark plumbing: the bench stack, fleet payloads, result tables and JSON files."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from fleetwatch.settings import PROJECT_ROOT, Settings

RESULTS = PROJECT_ROOT / "bench" / "results"
console = Console(width=170)

# The bench stack has its own run folder and ports, so it never disturbs a demo or a test run.
BENCH_ENV = {
    "FLEETWATCH_RUN_DIR": str(PROJECT_ROOT / ".run" / "bench"),
    "FLEETWATCH_KAFKA_PORT": "26092",
    "FLEETWATCH_KAFKA_CONTROLLER_PORT": "26093",
    "FLEETWATCH_MQTT_PORT": "26883",
    "FLEETWATCH_PG_PORT": "26432",
    "FLEETWATCH_API_PORT": "26080",
}
SIGNALS_12 = ["engine_rpm", "engine_load_pct", "oil_pressure_kpa", "oil_temp_c", "coolant_temp_c",
              "ambient_temp_c", "hydraulic_pressure_bar", "vibration_mm_s", "battery_v", "air_filter_dp_kpa",
              "fuel_rate_lph", "fuel_filter_dp_kpa"]
NOMINAL_12 = [1800, 60, 320, 95, 88, 20, 190, 3, 13.9, 2.5, 20, 30]


def bench_settings(**overrides: Any) -> Settings:
    """Settings of the bench stack (environment values set by the caller still win)."""
    for k, v in BENCH_ENV.items():
        os.environ.setdefault(k, v)
    return Settings(**overrides)


@contextmanager
def bench_stack(components: list[str], **overrides: Any) -> Iterator[Settings]:
    """Start the named components of the bench stack for the duration of a block."""
    from fleetwatch.stack import Stack

    s = bench_settings(**overrides)
    stack = Stack(s)
    stack.ensure_debian_packages()
    stack.start(components)
    try:
        yield s
    finally:
        stack.down()


def fresh_database(s: Settings, name: str) -> str:
    """Create an empty PostgreSQL database on the bench server; its SQLAlchemy URL (a run never sees another's rows)."""
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 port={s.pg_port} user={s.pg_user} dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://{s.pg_user}@127.0.0.1:{s.pg_port}/{name}"


def fleet_messages(tractors: int, seconds: int, start: datetime | None = None, seed: int = 1) -> Iterator[
        tuple[str, bytes]]:
    """(tractor_id, v1 JSON payload) for every tractor every second: 12 readings each, healthy noise."""
    rng = np.random.default_rng(seed)
    start = start or (datetime.now(UTC) - timedelta(seconds=seconds)).replace(microsecond=0)
    ids = [f"T{i + 1:05d}" for i in range(tractors)]
    nominal = np.asarray(NOMINAL_12)
    for t in range(seconds):
        ts = (start + timedelta(seconds=t)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        values = np.round(nominal * (1 + rng.normal(0, 0.01, (tractors, 12))), 3).tolist()
        for i, tid in enumerate(ids):
            doc = {"v": 1, "tractor_id": tid, "seq": t + 1,
                   "samples": [{"ts": ts, "engine_hours": 1000.0 + t / 3600,
                                "readings": dict(zip(SIGNALS_12, values[i], strict=True))}]}
            yield tid, json.dumps(doc, separators=(",", ":")).encode()


def create_topic(s: Settings, topic: str, partitions: int = 4) -> None:
    """Create a benchmark topic (replication 1) on the bench Kafka."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=s.bootstrap)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        admin.close()


def report(name: str, title: str, columns: list[str], rows: list[list[Any]], extra: dict[str, Any]) -> Path:
    """Print a table and write ``bench/results/<name>.json`` with the rows and context."""
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*[f"{v:,.2f}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    doc = {"benchmark": name, "title": title, "when": datetime.now(UTC).isoformat(),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
           "columns": columns, "rows": rows, **extra}
    path.write_text(json.dumps(doc, indent=2, default=str))
    return path


class Stopwatch:
    """Wall-clock timer."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def seconds(self) -> float:
        """Seconds since creation."""
        return time.perf_counter() - self.t0

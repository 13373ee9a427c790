"""The functions runtime against real Kafka (and PostgreSQL for exactly-once): each mapping behaviour end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from fleetwatch.db import upgrade
from fleetwatch.settings import Settings
from functions import examples, store
from functions.config import FunctionConfig
from functions.db import make_engine, make_sessions
from functions.worker import KafkaWorker

pytestmark = pytest.mark.services
FLEETWATCH = str(Path(sys.executable).with_name("fleetwatch"))


# ---------------------------------------------------------------------------------------------- helpers
def create_topic(s: Settings, name: str, partitions: int) -> str:
    admin = KafkaAdminClient(bootstrap_servers=s.bootstrap)
    try:
        admin.create_topics([NewTopic(s.topic(name), partitions, 1)])
    finally:
        admin.close()
    consumer = KafkaConsumer(bootstrap_servers=s.bootstrap)
    try:  # wait until brokers serve the new topic's metadata, so a subscriber sees its partitions at once
        deadline = time.monotonic() + 20
        while len(consumer.partitions_for_topic(s.topic(name)) or ()) < partitions and time.monotonic() < deadline:
            time.sleep(0.1)
            consumer.topics()  # refreshes the metadata of every topic
    finally:
        consumer.close()
    return s.topic(name)


def produce(s: Settings, name: str, values: list[dict[str, Any]], timestamps: list[int] | None = None,
            partition: int | None = None) -> None:
    producer = KafkaProducer(bootstrap_servers=s.bootstrap, acks="all", linger_ms=5)
    for i, v in enumerate(values):
        producer.send(s.topic(name), json.dumps(v).encode(), key=f"k{i}".encode(), partition=partition,
                      timestamp_ms=timestamps[i] if timestamps else None)
    producer.flush()
    producer.close()


def failures(s: Settings, name: str, expect: int, wait_s: float = 10.0) -> list[dict[str, Any]]:
    consumer = KafkaConsumer(s.topic(f"{name}.failures"), bootstrap_servers=s.bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=1500)
    docs: list[dict[str, Any]] = []
    deadline = time.monotonic() + wait_s
    try:
        while time.monotonic() < deadline:
            docs += [json.loads(m.value) for m in consumer]
            if len(docs) >= expect:
                break
    finally:
        consumer.close()
    return docs


def function(name: str, **options: Any) -> FunctionConfig:
    base = {"name": name, "handler": "functions.examples:store_rows", "source_topics": [name], "batch_size": 100,
            "maximum_batching_window_s": 0.2, "params": {"table": "rows"}}
    return FunctionConfig.model_validate(base | options)


@pytest.fixture()
def sqlite_db(tmp_path: Path) -> Iterator[tuple[str, Engine, sessionmaker[Session]]]:
    url = f"sqlite:///{tmp_path / 'fn.db'}"
    yield from _database(url)


@pytest.fixture()
def pg_db(pg_url: str) -> Iterator[tuple[str, Engine, sessionmaker[Session]]]:
    yield from _database(pg_url)


def _database(url: str) -> Iterator[tuple[str, Engine, sessionmaker[Session]]]:
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text('CREATE TABLE rows (topic TEXT, part INTEGER, "offset" BIGINT, worker TEXT)'))
        conn.execute(text("CREATE TABLE sums (shard TEXT, window_start TEXT, n INTEGER, total INTEGER)"))
    yield url, engine, make_sessions(engine)
    engine.dispose()


def committed(sessions: sessionmaker[Session], s: Settings, fn: FunctionConfig) -> int:
    with sessions() as session:
        return sum(store.load_offsets(session, s.topic(fn.group), s.topic(fn.source_topics[0])).values())


def outbox_empty(sessions: sessionmaker[Session]) -> bool:
    with sessions() as session:
        return session.execute(select(func.count()).select_from(store.outbox)).scalar_one() == 0


def run_worker(s: Settings, fn: FunctionConfig, sessions: sessionmaker[Session], done: Callable[[], bool],
               timeout_s: float = 60) -> KafkaWorker:
    """Run one worker in this (main) thread until ``done()``; fail the test if that takes too long."""
    worker = KafkaWorker(fn, s.bootstrap, sessions, s.topic_prefix)
    deadline = time.monotonic() + timeout_s
    try:
        worker.run(until=lambda: done() or time.monotonic() > deadline)
    finally:
        worker.close()
    assert done(), f"worker did not finish within {timeout_s}s"
    return worker


def table_rows(engine: Engine) -> list[tuple[int, int]]:
    with engine.connect() as conn:
        return [(r.part, r.offset) for r in conn.execute(text('SELECT part, "offset" FROM rows ORDER BY 1, 2'))]


# ---------------------------------------------------------------------------------------------- tests
def test_retries_then_bisect_isolate_one_poison_record_among_1000(isolated: Settings, sqlite_db: Any) -> None:
    _, engine, sessions = sqlite_db
    fn = function("poison", maximum_retry_attempts=2)
    create_topic(isolated, "poison", 4)
    create_topic(isolated, "poison.failures", 1)
    values = [{"i": i, "poison": i == 437} for i in range(1000)]
    produce(isolated, "poison", values)
    run_worker(isolated, fn, sessions, lambda: committed(sessions, isolated, fn) == 1000 and outbox_empty(sessions))
    docs = failures(isolated, "poison", 1)
    assert len(docs) == 1
    doc = docs[0]
    assert doc["value_json"] == {"i": 437, "poison": True}
    assert doc["condition"] == "RetryAttemptsExhausted" and "poison record" in doc["detail"]
    assert doc["topic"] == isolated.topic("poison") and doc["key_b64"] and doc["consumer_group"]
    assert len(table_rows(engine)) == 999 == len(set(table_rows(engine)))
    assert (doc["partition"], doc["offset"]) not in table_rows(engine)


class Outage:
    """A session factory whose database is unreachable for its next ``down`` uses."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self.down = 0
        self.started = False

    def __call__(self) -> Session:
        if self.down:
            self.down -= 1
            raise OperationalError("connect", None, Exception("connection refused"))
        return self.sessions()


def test_a_database_still_down_at_the_rewind_does_not_skip_the_failed_batch(isolated: Settings,
                                                                            sqlite_db: Any) -> None:
    # The database goes away as the second batch starts and is still away when the worker tries to rewind to
    # the stored offsets. The worker must not read on from where its consumer got to: the second batch would
    # never be handled while the third's offsets are committed past it.
    _, engine, sessions = sqlite_db
    fn = function("outage", batch_size=100, maximum_batching_window_s=0.5)
    create_topic(isolated, "outage", 1)
    create_topic(isolated, "outage.failures", 1)
    produce(isolated, "outage", [{"i": i} for i in range(300)])
    outage = Outage(sessions)

    def done() -> bool:
        offset = committed(sessions, isolated, fn)
        if offset == 100 and not outage.started:
            outage.down = 2  # the second batch's invocation, then the rewind
            outage.started = True
        return offset == 300

    run_worker(isolated, fn, outage, done)  # type: ignore[arg-type]
    assert outage.down == 0
    assert table_rows(engine) == [(0, i) for i in range(300)]


def test_partial_batch_failure_resumes_at_the_lowest_failed_offset(isolated: Settings, sqlite_db: Any) -> None:
    _, engine, sessions = sqlite_db
    fn = function("partial", batch_size=50, maximum_batching_window_s=1.0, maximum_retry_attempts=5,
                  function_response_types=["ReportBatchItemFailures"], params={"table": "rows", "trace": True})
    create_topic(isolated, "partial", 1)
    produce(isolated, "partial", [{"i": i, "fail_times": 2 if i == 20 else 0} for i in range(50)])
    examples.TRACE.clear()
    examples.ATTEMPTS.clear()
    run_worker(isolated, fn, sessions, lambda: committed(sessions, isolated, fn) == 50)
    assert table_rows(engine) == [(0, i) for i in range(50)]
    first = examples.TRACE[0]
    assert 20 in first  # the batch that reported offset 20 ...
    resumed = [t for t in examples.TRACE[1:] if t and t[0] == 20]
    assert len(resumed) == 2 and all(t == list(range(20, t[-1] + 1)) for t in resumed)  # ... resumed at 20, twice
    with engine.connect() as conn:
        outcomes = [r[0] for r in conn.execute(select(store.fn_invocations.c.outcome))]
    assert outcomes.count("partial") == 2


def test_filters_drop_only_non_matching_records_and_commit_them(isolated: Settings, sqlite_db: Any) -> None:
    _, engine, sessions = sqlite_db
    fn = function("filtered", filter_criteria=[{"value": {"kind": ["alert"], "level": [{"numeric": [">=", 3]}]}},
                                               {"value": {"tag": [{"prefix": "keep-"}]}}])
    create_topic(isolated, "filtered", 1)
    values = [{"kind": "alert", "level": i % 5} if i % 2 else {"tag": "keep-me" if i % 4 == 0 else "drop"}
              for i in range(60)]
    produce(isolated, "filtered", values)
    run_worker(isolated, fn, sessions, lambda: committed(sessions, isolated, fn) == 60)
    expected = [i for i, v in enumerate(values)
                if (v.get("kind") == "alert" and v["level"] >= 3) or v.get("tag", "").startswith("keep-")]
    assert table_rows(engine) == [(0, i) for i in expected]
    assert 0 < len(expected) < 60


def test_records_past_the_maximum_age_go_to_on_failure(isolated: Settings, sqlite_db: Any) -> None:
    _, engine, sessions = sqlite_db
    fn = function("aged", maximum_record_age_s=60)
    create_topic(isolated, "aged", 1)
    create_topic(isolated, "aged.failures", 1)
    now = int(time.time() * 1000)
    produce(isolated, "aged", [{"i": i} for i in range(10)],
            timestamps=[now - 3_600_000 if i in (0, 1, 2, 7) else now for i in range(10)])
    run_worker(isolated, fn, sessions, lambda: committed(sessions, isolated, fn) == 10 and outbox_empty(sessions))
    docs = failures(isolated, "aged", 4)
    assert sorted((d["offset"], d["condition"]) for d in docs) == [(i, "RecordAgeExceeded") for i in (0, 1, 2, 7)]
    assert table_rows(engine) == [(0, i) for i in (3, 4, 5, 6, 8, 9)]


def test_latest_start_skips_the_backlog_and_a_restart_keeps_what_arrived_in_between(isolated: Settings,
                                                                                     sqlite_db: Any) -> None:
    _, engine, sessions = sqlite_db
    fn = function("latest", starting_position="LATEST")
    create_topic(isolated, "latest", 1)
    produce(isolated, "latest", [{"i": i} for i in range(10)])
    # First run: the start (end of the log) is stored as soon as the partition is assigned; nothing is read.
    run_worker(isolated, fn, sessions, lambda: committed(sessions, isolated, fn) == 10)
    assert table_rows(engine) == []
    produce(isolated, "latest", [{"i": i} for i in range(10, 15)])  # while no worker runs
    run_worker(isolated, fn, sessions, lambda: committed(sessions, isolated, fn) == 15)
    assert table_rows(engine) == [(0, i) for i in range(10, 15)]


def test_at_timestamp_start_reads_from_the_first_record_at_or_after_it(isolated: Settings, sqlite_db: Any) -> None:
    _, engine, sessions = sqlite_db
    now = int(time.time() * 1000)
    fn = function("stamped", starting_position="AT_TIMESTAMP",
                  starting_position_timestamp=datetime.fromtimestamp((now - 3_600_000) / 1000, UTC))
    create_topic(isolated, "stamped", 1)
    produce(isolated, "stamped", [{"i": i} for i in range(10)],
            timestamps=[now - 7_200_000 if i < 6 else now - 600_000 for i in range(10)])
    run_worker(isolated, fn, sessions, lambda: committed(sessions, isolated, fn) == 10)
    assert table_rows(engine) == [(0, i) for i in range(6, 10)]


def test_tumbling_windows_pass_state_and_retry_the_final_invocation(isolated: Settings, sqlite_db: Any) -> None:
    _, engine, sessions = sqlite_db
    fn = function("windows", handler="functions.examples:window_sum", batch_size=8, tumbling_window_s=60,
                  params={"table": "sums", "fail_final": True})
    create_topic(isolated, "windows", 1)
    start = (int(time.time() * 1000) // 60_000 - 10) * 60_000
    counts = [12, 5, 20]
    timestamps = [start + w * 60_000 + i for w, c in enumerate(counts) for i in range(c)]
    produce(isolated, "windows", [{"n": i + 1} for c in counts for i in range(c)], timestamps=timestamps)
    examples.FINAL_FAILURES.clear()

    def closed() -> int:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM sums")).scalar_one()

    run_worker(isolated, fn, sessions, lambda: closed() == 3)
    with engine.connect() as conn:
        sums = [tuple(r) for r in conn.execute(text("SELECT n, total FROM sums ORDER BY window_start"))]
        open_windows = conn.execute(select(func.count()).select_from(store.fn_window_state)).scalar_one()
    assert sums == [(12, 78), (5, 15), (20, 210)]  # state carried across batches of 8 within each window
    assert sorted(examples.FINAL_FAILURES.values()) == [1, 1, 1] and open_windows == 0


def test_timeout_stops_the_invocation_and_counts_as_an_error(isolated: Settings, sqlite_db: Any) -> None:
    _, engine, sessions = sqlite_db
    fn = function("slow", timeout_s=1, maximum_retry_attempts=0, batch_size=10, maximum_batching_window_s=1.0)
    create_topic(isolated, "slow", 1)
    create_topic(isolated, "slow.failures", 1)
    produce(isolated, "slow", [{"i": i, "sleep_s": 30 if i == 3 else 0} for i in range(6)])
    started = time.monotonic()
    run_worker(isolated, fn, sessions, lambda: committed(sessions, isolated, fn) == 6 and outbox_empty(sessions))
    assert time.monotonic() - started < 25  # never waited for the 30 s sleep
    docs = failures(isolated, "slow", 1)
    assert [d["offset"] for d in docs] == [3] and "InvocationTimeout" in docs[0]["detail"]
    assert table_rows(engine) == [(0, i) for i in (0, 1, 2, 4, 5)]
    with engine.connect() as conn:
        timeouts = conn.execute(text("SELECT count(*) FROM fn_invocations WHERE outcome = 'timeout'")).scalar_one()
    assert timeouts >= 2


def write_functions_file(path: Path, *functions: dict[str, Any]) -> Path:
    lines: list[str] = []
    for fn in functions:
        lines.append("[[function]]")
        for k, v in fn.items():
            if k != "params":
                lines.append(f"{k} = {json.dumps(v)}")
        lines.append("[function.params]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in fn.get("params", {}).items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("handler", ["store_rows", "store_rows_deferred"])
def test_kill_9_mid_batch_then_restart_leaves_exactly_one_row_per_record(isolated: Settings, pg_db: Any,
                                                                         tmp_path: Path, handler: str) -> None:
    url, engine, sessions = pg_db
    # store_rows_deferred runs pipelined: the kill may hit a batch whose commit is running in the background.
    spec = {"name": "killed", "handler": f"functions.examples:{handler}", "source_topics": ["killed"],
            "batch_size": 50, "maximum_batching_window_s": 0.1, "pipelined": handler.endswith("deferred"),
            "params": {"table": "rows", "sleep_s": 0.4}}
    env = os.environ | {"FLEETWATCH_FUNCTIONS_FILE": str(write_functions_file(tmp_path / "fn.toml", spec)),
                        "FLEETWATCH_DATABASE_URL": url}
    fn = FunctionConfig.model_validate(spec)
    create_topic(isolated, "killed", 4)
    produce(isolated, "killed", [{"i": i} for i in range(1000)])

    def count() -> int:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM rows")).scalar_one()

    kills = 0
    for threshold in (300,):
        proc = subprocess.Popen([FLEETWATCH, "functions", "run", "killed"], env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while count() < threshold and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # inside the next batch's half-way pause: its inserts are in flight, uncommitted
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        assert count() < 1000, "the worker finished before it could be killed"
    proc = subprocess.Popen([FLEETWATCH, "functions", "run", "killed"], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while committed(sessions, isolated, fn) < 1000 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert kills == 1
    with engine.connect() as conn:
        total, distinct = conn.execute(text('SELECT count(*), count(DISTINCT (part, "offset")) FROM rows')).one()
    assert (total, distinct) == (1000, 1000)


def test_a_pipelined_function_commits_in_the_background_and_a_failed_commit_is_redone_once(
        isolated: Settings, pg_db: Any) -> None:
    _, engine, sessions = pg_db
    examples.WRITERS.clear()
    examples.COMMIT_FAILED.clear()
    fn = function("piped", handler="functions.examples:store_rows_deferred", pipelined=True, batch_size=50,
                  params={"table": "rows", "fail_commit_at": 120})
    create_topic(isolated, "piped", 2)
    produce(isolated, "piped", [{"i": i} for i in range(600)])
    worker = run_worker(isolated, fn, sessions, lambda: committed(sessions, isolated, fn) >= 600)
    with engine.connect() as conn:
        total, distinct = conn.execute(text('SELECT count(*), count(DISTINCT (part, "offset")) FROM rows')).one()
    assert (total, distinct) == (600, 600)  # the failed batch and the one handled meanwhile: redone, once
    assert examples.COMMIT_FAILED[120] == 1
    assert "fn-commit" in examples.WRITERS  # writes ran on the background commit thread
    assert "MainThread" in examples.WRITERS  # the batch whose commit failed was handled again synchronously
    assert worker.invoker.stats.background_commits >= 600 // 50


def group_members(s: Settings, group: str) -> list[list[int]]:
    admin = KafkaAdminClient(bootstrap_servers=s.bootstrap)
    try:
        info = admin.describe_groups([group])[group]
    finally:
        admin.close()
    if info["group_state"] != "Stable":
        return []
    return [sorted(p for a in (m["member_assignment"] or {}).get("assigned_partitions", []) for p in a["partitions"])
            for m in info["members"]]


def test_two_workers_share_two_partitions_and_a_third_idles(isolated: Settings, pg_db: Any, tmp_path: Path) -> None:
    url, engine, sessions = pg_db
    spec = {"name": "shared", "handler": "functions.examples:store_rows", "source_topics": ["shared"],
            "batch_size": 20, "maximum_batching_window_s": 0.1, "params": {"table": "rows"}}
    port = isolated.api_port + 7
    env = os.environ | {"FLEETWATCH_FUNCTIONS_FILE": str(write_functions_file(tmp_path / "fn.toml", spec)),
                        "FLEETWATCH_DATABASE_URL": url}
    fn = FunctionConfig.model_validate(spec)
    create_topic(isolated, "shared", 2)
    pool = subprocess.Popen([FLEETWATCH, "functions", "run", "shared", "--workers", "3", "--metrics-port", str(port)],
                            env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        members: list[list[int]] = []
        while time.monotonic() < deadline:
            members = group_members(isolated, isolated.topic("shared"))
            if len(members) == 3 and sorted(members) == [[], [0], [1]]:
                break
            time.sleep(0.5)
        assert sorted(members) == [[], [0], [1]], f"assignments {members}"
        produce(isolated, "shared", [{"i": i} for i in range(400)])
        deadline = time.monotonic() + 60
        while committed(sessions, isolated, fn) < 400 and time.monotonic() < deadline:
            time.sleep(0.2)
        with engine.connect() as conn:
            total, distinct, workers = conn.execute(text(
                'SELECT count(*), count(DISTINCT (part, "offset")), count(DISTINCT worker) FROM rows')).one()
            per_partition = dict(conn.execute(
                text("SELECT part, count(DISTINCT worker) FROM rows GROUP BY part")).all())
        assert (total, distinct, workers) == (400, 400, 2)
        assert per_partition == {0: 1, 1: 1}  # one owner per partition, the third member idled
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'fleetwatch_function_workers{function="shared"} 3' in body
        assert 'fleetwatch_function_offset_lag{function="shared",' in body
        assert "fleetwatch_function_invocations_total" in body
    finally:
        pool.send_signal(signal.SIGTERM)
        assert pool.wait(60) == 0
    cli_env = env | {"COLUMNS": "200"}
    stats = subprocess.run([FLEETWATCH, "functions", "stats", "shared", "--format", "json"], env=cli_env,
                           capture_output=True, text=True, timeout=60)
    assert stats.returncode == 0, stats.stderr
    st = json.loads(stats.stdout)[0]
    assert st["invocations"] >= 2 and st["errors"] == 0 and st["offset_lag"] == 0
    assert st["records_processed"] == 400 and st["duration_p99_ms"] >= st["duration_p50_ms"] > 0
    logs = subprocess.run([FLEETWATCH, "functions", "logs", "shared", "--limit", "2"], env=cli_env,
                          capture_output=True, text=True, timeout=60)
    assert logs.returncode == 0, logs.stderr
    assert [line.split()[1] for line in logs.stdout.splitlines()] == ["START", "END", "REPORT"] * 2


def workers_metric(port: int, name: str) -> int | None:
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    except OSError:
        return None
    for line in body.splitlines():
        if line.startswith(f'fleetwatch_function_workers{{function="{name}"}}'):
            return int(float(line.split()[-1]))
    return None


def test_autoscale_grows_from_min_to_max_workers_under_lag_and_shrinks_when_idle(isolated: Settings, pg_db: Any,
                                                                                  tmp_path: Path) -> None:
    url, engine, sessions = pg_db
    spec = {"name": "scaled", "handler": "functions.examples:store_rows", "source_topics": ["scaled"],
            "batch_size": 20, "maximum_batching_window_s": 0.1, "workers_min": 1, "workers_max": 3,
            "scale_lag_per_worker": 100, "scale_interval_s": 0.5,
            "params": {"table": "rows", "sleep_s": 0.2}}  # ~100 records/s per worker: the lag lasts
    port = isolated.api_port + 8
    env = os.environ | {"FLEETWATCH_FUNCTIONS_FILE": str(write_functions_file(tmp_path / "fn.toml", spec)),
                        "FLEETWATCH_DATABASE_URL": url}
    fn = FunctionConfig.model_validate(spec)
    create_topic(isolated, "scaled", 4)
    produce(isolated, "scaled", [{"i": i} for i in range(2000)])
    log_path = tmp_path / "pool.log"
    pool = subprocess.Popen([FLEETWATCH, "functions", "run", "scaled", "--autoscale", "--metrics-port", str(port)],
                            env=env, stderr=log_path.open("wb"))
    seen: list[int | None] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not seen or seen[-1] != 3):
            seen.append(workers_metric(port, "scaled"))
            time.sleep(0.3)
        assert seen[-1] == 3, f"workers seen {seen}"
        deadline = time.monotonic() + 180
        while committed(sessions, isolated, fn) < 2000 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert committed(sessions, isolated, fn) == 2000
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and seen[-1] != 1:  # the topic is idle now: back to workers_min
            seen.append(workers_metric(port, "scaled"))
            time.sleep(0.5)
        assert seen[-1] == 1, f"workers seen {seen}"
    finally:
        pool.send_signal(signal.SIGTERM)
        assert pool.wait(60) == 0
    with engine.connect() as conn:
        total, distinct, workers = conn.execute(text(
            'SELECT count(*), count(DISTINCT (part, "offset")), count(DISTINCT worker) FROM rows')).one()
    assert (total, distinct) == (2000, 2000) and workers >= 2  # rebalanced while scaling, nothing doubled
    log = log_path.read_text()
    assert "scaling up 1 -> 3" in log and "scaling down 2 -> 1" in log, log[-3000:]

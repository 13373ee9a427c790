"""Event-source-mapping semantics, run in-process with an in-memory record source (no services)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from functions import examples, store
from functions.config import FunctionConfig
from functions.db import make_engine, make_sessions
from functions.local import MemorySource, run_local
from functions.model import Context, event_records
from functions.runtime import DbCheckpointer, Fenced, Invoker, MemoryCheckpointer

HOUR_MS = 3_600_000


def config(**options: Any) -> FunctionConfig:
    return FunctionConfig.model_validate({"name": "unit", "handler": "functions.examples:noop",
                                          "source_topics": ["in"], **options})


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[tuple[Engine, sessionmaker[Session]]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'unit.db'}")
    store.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text('CREATE TABLE rows (topic TEXT, part INTEGER, "offset" INTEGER, worker TEXT)'))
        conn.execute(text("CREATE TABLE sums (shard TEXT, window_start TEXT, n INTEGER, total INTEGER)"))
    yield engine, make_sessions(engine)
    engine.dispose()


def rows(engine: Engine) -> list[tuple[int, int]]:
    with engine.connect() as conn:
        return [(r.part, r.offset) for r in conn.execute(text('SELECT part, "offset" FROM rows ORDER BY 1, 2'))]


def outbox_docs(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [json.loads(r.value) for r in conn.execute(select(store.outbox).order_by(store.outbox.c.id))]


class Recorder:
    """A non-transactional handler that fails on poison records and remembers what it processed."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.batches: list[list[int]] = []

    def __call__(self, event: dict[str, Any], context: Context) -> None:
        recs = event_records(event)
        self.batches.append([r["offset"] for r in recs])
        if any(r["json"].get("poison") for r in recs):
            raise ValueError("poison")
        self.seen.extend(r["offset"] for r in recs)


def test_retries_then_bisect_isolate_one_poison_record_among_1000() -> None:
    handler = Recorder()
    source = MemorySource.of("in", [{"i": i, "poison": i == 537} for i in range(1000)])
    result = run_local(config(batch_size=100, maximum_retry_attempts=2, transactional=False), handler, source)
    assert [(d["offset"], d["condition"]) for d in result.failures] == [(537, "RetryAttemptsExhausted")]
    doc = result.failures[0]
    assert doc["value_json"] == {"i": 537, "poison": True} and "ValueError: poison" in doc["detail"]
    assert sorted(set(handler.seen)) == [i for i in range(1000) if i != 537]
    assert result.offsets == {("in", 0): 1000}
    # the failing batch was tried 1 + 2 times before being split
    assert handler.batches.count(list(range(500, 600))) == 3


def test_without_bisect_the_whole_failing_batch_goes_to_on_failure() -> None:
    source = MemorySource.of("in", [{"i": i, "poison": i == 5} for i in range(20)])
    result = run_local(config(batch_size=10, bisect_batch_on_error=False, maximum_retry_attempts=0,
                              transactional=False), Recorder(), source)
    assert [d["offset"] for d in result.failures] == list(range(10))
    assert result.offsets == {("in", 0): 20}


def test_transactional_poison_leaves_exactly_the_good_rows_and_one_outbox_document(db: Any) -> None:
    engine, sessions = db
    source = MemorySource.of("in", [{"i": i, "poison": i == 537} for i in range(1000)], partitions=2)
    fn = config(handler="functions.examples:store_rows", batch_size=100, params={"table": "rows"})
    run_local(fn, examples.store_rows, source, sessions=sessions)
    expected = sorted((i % 2, i // 2) for i in range(1000) if i != 537)
    assert rows(engine) == expected
    docs = outbox_docs(engine)
    assert [(d["partition"], d["offset"], d["topic"]) for d in docs] == [(1, 268, "in")]
    with sessions() as s:
        assert store.load_offsets(s, "unit", "in") == {0: 500, 1: 500}


def test_partial_batch_failure_checkpoints_at_the_lowest_failed_offset(db: Any) -> None:
    engine, sessions = db
    examples.TRACE.clear()
    values = [{"i": i, "fail_times": 2 if i == 20 else 0} for i in range(50)]
    fn = config(handler="functions.examples:store_rows", batch_size=50, params={"table": "rows", "trace": True},
                function_response_types=["ReportBatchItemFailures"], maximum_retry_attempts=5)
    result = run_local(fn, examples.store_rows, MemorySource.of("in", values), sessions=sessions)
    assert rows(engine) == [(0, i) for i in range(50)]  # every record exactly once
    assert result.failures == []
    # the first invocation reports 20; the good prefix 0..19 is committed alone; retries resume at 20
    assert examples.TRACE[:3] == [list(range(50)), list(range(20)), list(range(20, 50))]
    assert examples.TRACE[-1] == list(range(20, 50))


def test_partial_failure_without_transaction_commits_the_prefix_like_lambda() -> None:
    calls: list[list[int]] = []

    def handler(event: dict[str, Any], context: Context) -> dict[str, Any]:
        offsets = [r["offset"] for r in event_records(event)]
        calls.append(offsets)
        return {"batchItemFailures": [{"itemIdentifier": "in-0:7"}]} if 7 in offsets and len(calls) < 3 else {}

    checkpoints = MemoryCheckpointer()
    result = run_local(config(batch_size=10, transactional=False, maximum_retry_attempts=5,
                              function_response_types=["ReportBatchItemFailures"]),
                       handler, MemorySource.of("in", [{}] * 10), checkpointer=checkpoints)
    assert calls == [list(range(10)), list(range(7, 10)), list(range(7, 10))]
    assert result.offsets == {("in", 0): 10} and checkpoints.commits == 2


def test_unknown_batch_item_identifier_fails_the_whole_batch() -> None:
    def handler(event: dict[str, Any], context: Context) -> dict[str, Any]:
        return {"batchItemFailures": [{"itemIdentifier": "nonsense"}]}

    result = run_local(config(batch_size=4, transactional=False, maximum_retry_attempts=0,
                              bisect_batch_on_error=False, function_response_types=["ReportBatchItemFailures"]),
                       handler, MemorySource.of("in", [{}] * 4))
    assert [d["offset"] for d in result.failures] == [0, 1, 2, 3]
    assert "unknown record 'nonsense'" in result.failures[0]["detail"]


def test_filtered_records_are_committed_but_never_reach_the_handler(db: Any) -> None:
    engine, sessions = db
    values = [{"kind": "alert" if i % 3 == 0 else "debug", "i": i} for i in range(30)]
    fn = config(handler="functions.examples:store_rows", batch_size=10, params={"table": "rows"},
                filter_criteria=[{"value": {"kind": ["alert"]}}])
    run_local(fn, examples.store_rows, MemorySource.of("in", values), sessions=sessions)
    assert rows(engine) == [(0, i) for i in range(0, 30, 3)]
    with sessions() as s:
        assert store.load_offsets(s, "unit", "in") == {0: 30}  # trailing filtered records committed too
        filtered = s.execute(select(func.sum(store.fn_invocations.c.records_filtered))).scalar_one()
    assert filtered == 20


def test_a_batch_with_only_filtered_records_still_commits() -> None:
    handler = Recorder()
    result = run_local(config(batch_size=5, transactional=False, filter_criteria=['{"value": {"x": [1]}}']),
                       handler, MemorySource.of("in", [{"x": 2}] * 12))
    assert handler.batches == [] and result.offsets == {("in", 0): 12}
    assert result.invoker.stats.filtered_records == 12


def test_records_older_than_the_maximum_age_go_to_on_failure() -> None:
    handler = Recorder()
    source = MemorySource()
    now_ms = int(time.time() * 1000)
    for i in range(10):
        source.append("in", 0, json.dumps({"i": i}).encode(), timestamp_ms=now_ms - (HOUR_MS if i < 4 else 0))
    result = run_local(config(batch_size=10, transactional=False, maximum_record_age_s=60), handler, source)
    assert [(d["offset"], d["condition"]) for d in result.failures] == [(i, "RecordAgeExceeded") for i in range(4)]
    assert handler.seen == list(range(4, 10))
    assert result.offsets == {("in", 0): 10}


def test_records_that_age_out_while_being_retried_stop_being_retried() -> None:
    clock = [time.time()]

    def handler(event: dict[str, Any], context: Context) -> None:
        clock[0] += 30  # every failed attempt takes 30 s of (fake) time
        raise RuntimeError("down")

    source = MemorySource.of("in", [{}] * 3, timestamp_ms=int(clock[0] * 1000))
    result = run_local(config(batch_size=3, transactional=False, maximum_retry_attempts=-1, maximum_record_age_s=100),
                       handler, source, clock=lambda: clock[0])
    assert [d["condition"] for d in result.failures] == ["RecordAgeExceeded"] * 3


def test_timeout_stops_the_invocation_and_counts_as_an_error() -> None:
    calls: list[float] = []

    def handler(event: dict[str, Any], context: Context) -> None:
        calls.append(context.get_remaining_time_in_millis())
        if any(r["json"].get("slow") for r in event_records(event)):
            try:
                time.sleep(10)
            except Exception:  # a handler that swallows errors still cannot swallow the timeout
                pass

    started = time.monotonic()
    result = run_local(config(batch_size=4, transactional=False, timeout_s=0.2, maximum_retry_attempts=1),
                       handler, MemorySource.of("in", [{"slow": i == 2} for i in range(4)]))
    assert time.monotonic() - started < 5
    assert [d["offset"] for d in result.failures] == [2]
    assert "InvocationTimeout" in result.failures[0]["detail"]
    assert result.invoker.stats.timeouts >= 2 and result.invoker.stats.errors == result.invoker.stats.timeouts
    assert 0 < calls[0] <= 200


def window_source(counts: list[int], start_ms: int) -> MemorySource:
    source = MemorySource()
    for w, count in enumerate(counts):
        for i in range(count):
            source.append("in", 0, json.dumps({"n": i + 1}).encode(), timestamp_ms=start_ms + w * 60_000 + i)
    return source


@pytest.mark.parametrize("fail_final", [False, True])
def test_tumbling_windows_carry_state_and_end_with_a_final_invocation(db: Any, fail_final: bool) -> None:
    engine, sessions = db
    start = (int(time.time() * 1000) // 60_000 - 10) * 60_000
    fn = config(handler="functions.examples:window_sum", batch_size=7, tumbling_window_s=60,
                params={"table": "sums", "fail_final": fail_final})
    examples.FINAL_FAILURES.clear()
    result = run_local(fn, examples.window_sum, window_source([10, 3, 25], start), sessions=sessions)
    with engine.connect() as conn:
        sums = [tuple(r) for r in conn.execute(text("SELECT shard, n, total FROM sums ORDER BY window_start"))]
        state_rows = conn.execute(select(func.count()).select_from(store.fn_window_state)).scalar_one()
    assert sums == [("in-0", 10, 55), ("in-0", 3, 6), ("in-0", 25, 325)]  # batches of 7 split every window
    assert state_rows == 0 and result.invoker.stats.windows_closed == 3
    if fail_final:
        assert sorted(examples.FINAL_FAILURES.values()) == [1, 1, 1]


def test_tumbling_window_state_survives_a_restart(db: Any) -> None:
    engine, sessions = db
    start = (int(time.time() * 1000) // 60_000 + 5) * 60_000  # a window still open (in the future)
    fn = config(handler="functions.examples:window_sum", batch_size=5, tumbling_window_s=60,
                params={"table": "sums"})
    source = window_source([8], start)
    first = run_local(fn, examples.window_sum, MemorySource({("in", 0): source.records[("in", 0)][:5]}),
                      sessions=sessions)
    assert first.offsets == {("in", 0): 5}
    with sessions() as s:
        assert store.load_window_states(s, "unit", "in")[0][1] == {"count": 5, "sum": 15}
        windows = {("in", p): w for p, w in store.load_window_states(s, "unit", "in").items()}
    # a new worker resumes at offset 5 with the stored state and closes the window when its time has passed
    inv = Invoker(fn, examples.window_sum, DbCheckpointer("unit"), sessions, sleep=lambda s: None,
                  clock=lambda: start / 1000 + 120)
    inv.assign({("in", 0): 5}, windows)
    inv.process(source.records[("in", 0)][5:])
    inv.tick()
    with engine.connect() as conn:
        assert [tuple(r) for r in conn.execute(text("SELECT n, total FROM sums"))] == [(8, 36)]


def test_a_member_that_lost_its_partition_cannot_commit(db: Any) -> None:
    engine, sessions = db
    fn = config(handler="functions.examples:store_rows", batch_size=10, params={"table": "rows"})
    source = MemorySource.of("in", [{}] * 10)
    old, new = (Invoker(fn, examples.store_rows, DbCheckpointer("unit"), sessions, sleep=lambda s: None)
                for _ in range(2))
    old.assign({("in", 0): None})
    new.assign({("in", 0): None})
    new.process(source.records[("in", 0)])
    with pytest.raises(Fenced):
        old.process(source.records[("in", 0)])
    assert rows(engine) == [(0, i) for i in range(10)]


def test_a_database_lost_inside_a_driver_call_rewinds_instead_of_failing_the_records(db: Any) -> None:
    # A handler writing through the driver itself (PostgreSQL COPY) sees the driver's own error when the server
    # is killed. The records are fine: the worker must rewind to the stored offsets and retry them once the
    # database is back, not retry, bisect and send them to the on-failure destination.
    engine, sessions = db
    calls: list[int] = []

    def handler(event: dict[str, Any], context: Context) -> None:
        calls.append(len(event_records(event)))
        raise psycopg.errors.AdminShutdown("terminating connection due to administrator command")

    fn = config(batch_size=10, maximum_retry_attempts=2)
    inv = Invoker(fn, handler, DbCheckpointer("unit"), sessions, sleep=lambda s: None)
    inv.assign({("in", 0): None})
    with pytest.raises(OperationalError):
        inv.process(MemorySource.of("in", [{"i": i} for i in range(10)]).records[("in", 0)])
    assert calls == [10]  # tried once: no retries, no bisection
    assert inv.failures == [] and outbox_docs(engine) == []
    with sessions() as s:
        assert store.load_offsets(s, "unit", "in") == {}  # nothing checkpointed past the records


def test_emitted_messages_go_through_the_outbox_with_the_offsets(db: Any) -> None:
    engine, sessions = db

    def handler(event: dict[str, Any], context: Context) -> None:
        for r in event_records(event):
            context.emit("alerts", "k", {"seen": r["offset"]})

    run_local(config(batch_size=3), handler, MemorySource.of("in", [{}] * 3), sessions=sessions)
    assert outbox_docs(engine) == [{"seen": 0}, {"seen": 1}, {"seen": 2}]


def test_invocation_log_rows_hold_outcome_size_iterator_age_and_handler_output(db: Any) -> None:
    engine, sessions = db

    def handler(event: dict[str, Any], context: Context) -> None:
        context.logger.info("hello from %s", context.function_name)

    run_local(config(batch_size=5), handler, MemorySource.of("in", [{}] * 5), sessions=sessions)
    with engine.connect() as conn:
        row = conn.execute(select(store.fn_invocations)).one()
    assert (row.outcome, row.batch_size, row.log) == ("ok", 5, "INFO hello from unit")
    assert row.iterator_age_ms is not None and row.iterator_age_ms >= 0


def test_memory_checkpointer_fences_like_the_database() -> None:
    cp = MemoryCheckpointer(offsets={("in", 0): 5})
    with pytest.raises(Fenced):
        cp.commit(None, {("in", 0): 9}, {("in", 0): 3}, {})


def test_the_handler_sees_lambdas_kafka_event_with_every_field() -> None:
    source = MemorySource()
    source.append("in", 1, b'{"a": 1}', b"k1", 1_700_000_000_000)
    source.append("in", 0, b"not json", None, 1_700_000_000_001)
    seen: list[str] = []

    def handler(event: dict[str, Any], context: Context) -> None:
        seen.append(json.dumps(event, sort_keys=True))

    run_local(config(transactional=False), handler, source)
    event = json.loads(seen[0])
    assert list(event["records"]) == ["in-0", "in-1"]
    assert event["records"]["in-1"] == [{
        "topic": "in", "partition": 1, "offset": 0, "timestamp": 1_700_000_000_000, "timestampType": "CREATE_TIME",
        "key": "azE=", "value": "eyJhIjogMX0=", "headers": [], "json": {"a": 1}}]
    assert event["records"]["in-0"][0]["key"] is None and event["records"]["in-0"][0]["json"] is None


def test_records_done_out_of_order_move_the_offset_only_past_a_contiguous_prefix() -> None:
    fn = config(transactional=False, batch_size=10, maximum_retry_attempts=0,
                function_response_types=["ReportBatchItemFailures"])
    source = MemorySource.of("in", [{"i": i, "fail": i == 3} for i in range(10)], partitions=2)

    def handler(event: dict[str, Any], context: Context) -> dict[str, Any]:
        failed = [r for r in event_records(event) if r["json"]["fail"]]
        return {"batchItemFailures": [{"itemIdentifier": f"{r['partition']}:{r['offset']}"} for r in failed]}

    result = run_local(fn, handler, source)
    assert result.offsets == {("in", 0): 5, ("in", 1): 5}
    assert [(d["partition"], d["offset"]) for d in result.failures] == [(1, 1)]

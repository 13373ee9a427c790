"""The trend function's state handling: cached states between batches equal what the table stores."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update

from functions.model import Context, Metrics
from tests.trends.test_detect import fleet_records
from trends.detect import Detector, Params, flatten, handler, load_parts
from trends.tables import trend_state, trend_windows


def test_cached_states_survive_a_rolled_back_batch_and_a_write_by_another_worker(tmp_path: Path) -> None:
    _states_match_the_table(f"sqlite:///{tmp_path / 'h.db'}")


@pytest.mark.services
def test_states_written_through_the_postgresql_staging_table_match_the_detectors(pg_url: str) -> None:
    _states_match_the_table(pg_url)


@pytest.mark.services
def test_states_are_stored_compressed_with_lz4_on_postgresql(pg_url: str) -> None:
    from fleetwatch.db import upgrade
    from functions.db import make_engine, make_sessions

    upgrade(pg_url)
    engine = make_engine(pg_url)
    sessions = make_sessions(engine)
    records = fleet_records(8, tractors=3)
    for a in range(0, len(records), 200):
        with sessions() as session:
            handler({"records": {"telemetry-0": records[a:a + 200]}}, Context("trends-detect", 60, session, {},
                                                                              Metrics()))
            session.commit()
    with sessions() as session:
        methods = session.execute(text(
            "SELECT pg_column_compression(state), pg_column_compression(live) FROM trend_state")).all()
    engine.dispose()
    used = {m for row in methods for m in row if m is not None}  # None: a value too small to compress
    assert used == {"lz4"}


@pytest.mark.services
@pytest.mark.parametrize("fail_once", [False, True])
def test_pipelined_batches_store_what_the_detector_computes_and_keep_using_cached_states(
        pg_url: str, monkeypatch: pytest.MonkeyPatch, fail_once: bool) -> None:
    import trends.detect as detect
    from fleetwatch.db import upgrade
    from functions.config import FunctionConfig
    from functions.db import make_engine, make_sessions
    from functions.local import MemorySource, run_local

    upgrade(pg_url)
    engine = make_engine(pg_url)
    sessions = make_sessions(engine)
    records = fleet_records(8, tractors=3)
    source = MemorySource()
    for r in records:
        source.append("telemetry", 0, json.dumps(r["json"]).encode())
    fn = FunctionConfig.model_validate({"name": "trends-detect", "handler": "trends.detect:handler",
                                        "source_topics": ["telemetry"], "batch_size": 40, "pipelined": True})
    write_states = detect._update_states_by_copy

    def slow_write(*args: Any) -> None:  # still writing when the next batch reads the tokens
        time.sleep(0.2)
        write_states(*args)

    monkeypatch.setattr(detect, "_update_states_by_copy", slow_write)
    if fail_once:
        # One attempt fails after caching its states, late enough that the batch before it has committed by
        # then: its retry must not take those states (their samples would count as seen, their windows lost).
        incr, calls = Metrics.incr, []

        def failing_incr(self: Metrics, name: str, value: float = 1) -> None:
            if name == "windows_closed":
                calls.append(name)
                if len(calls) == 5:
                    time.sleep(0.5)
                    raise RuntimeError("the handler failed after saving (test)")
            incr(self, name, value)

        monkeypatch.setattr(Metrics, "incr", failing_incr)
    result = run_local(fn, handler, source, sessions)

    with sessions() as session:
        det = Detector(load_parts(session, max_age_s=0), Params())
        rows = session.execute(select(trend_state.c.tractor_id, trend_state.c.state, trend_state.c.live)).all()
        stored_windows = len(session.execute(select(trend_windows.c.tractor_id)).all())
    engine.dispose()
    states: dict[str, Any] = {}
    partitions: dict[str, Any] = {}
    windows = 0
    for a in range(0, len(records), 40):
        windows += len(det.process(flatten(records[a:a + 40]), states, partitions, states.get).windows)
    # Every batch after the first was handled while the one before it was still committing in the background,
    # and its states came from the cache although the rows still held the tokens that commit replaces.
    batches = -(-len(records) // 40)
    assert result.invoker.stats.background_commits == batches
    assert result.invoker.stats.errors == int(fail_once)
    assert result.invoker.metrics.counters["state_cache_hits"] >= 3 * (batches - 2 * fail_once - 1)
    assert result.offsets == {("telemetry", 0): len(records)}
    assert stored_windows == windows > 0
    stored = {k: {**state, **live} for k, state, live in rows}
    assert stored == json.loads(json.dumps({**states, "~telemetry-0": partitions["telemetry-0"]}))


def _states_match_the_table(url: str) -> None:
    from fleetwatch.db import upgrade
    from functions.db import make_engine, make_sessions

    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessions(engine)
    records = fleet_records(8, tractors=3)
    batches = [records[a:a + 40] for a in range(0, len(records), 40)]
    with sessions() as session:
        det = Detector(load_parts(session, max_age_s=0), Params())
    states: dict[str, Any] = {}
    partitions: dict[str, Any] = {}
    windows = 0

    def invoke(batch: list[dict[str, Any]], commit: bool = True) -> Metrics:
        metrics = Metrics()
        with sessions() as session:
            handler({"records": {"telemetry-0": batch}}, Context("trends-detect", 60, session, {}, metrics))
            session.commit() if commit else session.rollback()
        return metrics

    for i, batch in enumerate(batches):
        if i in (0, 5):
            # This batch fails at commit: the cache must not keep its effects (and on PostgreSQL the first one
            # takes the connection's new staging table with it).
            invoke(batch, commit=False)
        if i == 9:
            with sessions() as session:  # another worker (after a rebalance) wrote these rows meanwhile
                session.execute(update(trend_state).values(generation=trend_state.c.generation + 1))
                session.commit()
        metrics = invoke(batch)
        assert (metrics.counters["state_cache_hits"] == 0) == (i in (0, 5, 9))
        out = det.process(flatten(batch), states, partitions, states.get)
        windows += len(out.windows)

    with sessions() as session:
        rows = session.execute(select(trend_state.c.tractor_id, trend_state.c.state, trend_state.c.live)).all()
        stored_windows = len(session.execute(select(trend_windows.c.tractor_id)).all())
    stored = {k: {**state, **live} for k, state, live in rows}
    assert stored_windows == windows > 0
    expected = json.loads(json.dumps({**states, "~telemetry-0": partitions["telemetry-0"]}))
    assert stored == expected
    engine.dispose()

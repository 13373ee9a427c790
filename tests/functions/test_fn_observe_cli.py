"""Config validation, autoscale policy, invocation logs, metrics text and the CLI's local commands (no services)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from fleetwatch.cli import app
from functions import store
from functions.config import ConfigError, load_functions
from functions.db import make_engine, make_sessions
from functions.local import MemorySource, run_local
from functions.model import Context, event_records
from functions.observe import function_stats, log_lines, prometheus_text
from functions.pool import ScalePolicy, WorkerPool

runner = CliRunner()


def write(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def test_bad_declarations_name_the_function_and_the_option(tmp_path: Path) -> None:
    base = '[[function]]\nname = "a"\nhandler = "m:h"\nsource_topics = ["t"]\n'
    with pytest.raises(ConfigError, match=r"function #1: .*filter_criteria.*numeric operator"):
        load_functions(write(tmp_path / "f.toml",
                             base + "filter_criteria = ['{\"value\": {\"n\": [{\"numeric\": [\"~\", 1]}]}}']\n"))
    with pytest.raises(ConfigError, match="batch_size"):
        load_functions(write(tmp_path / "f.toml", base + "batch_size = 0\n"))
    with pytest.raises(ConfigError, match="bacth_size"):
        load_functions(write(tmp_path / "f.toml", base + "bacth_size = 10\n"))
    with pytest.raises(ConfigError, match="workers_max must be >= workers_min"):
        load_functions(write(tmp_path / "f.toml", base + "workers_min = 3\nworkers_max = 2\n"))
    with pytest.raises(ConfigError, match="AT_TIMESTAMP needs"):
        load_functions(write(tmp_path / "f.toml", base + 'starting_position = "AT_TIMESTAMP"\n'))
    with pytest.raises(ConfigError, match="declared twice"):
        load_functions(write(tmp_path / "f.toml", base + base))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_functions(write(tmp_path / "f.toml", "[[function]\n"))


def test_the_shipped_functions_file_is_valid() -> None:
    functions = load_functions(Path(__file__).parents[2] / "fleetwatch" / "functions.toml")
    assert {"trends-detect", "ordering-place"} <= set(functions)


@pytest.mark.parametrize(("lag", "current", "partitions", "wanted"), [
    (0, 3, 4, 1), (999, 1, 4, 1), (1001, 1, 4, 2), (10_000, 1, 4, 4), (10_000, 1, 2, 2), (10_000, 1, 0, 6),
])
def test_autoscale_wants_workers_for_the_lag_within_bounds(lag: int, current: int, partitions: int,
                                                           wanted: int) -> None:
    assert ScalePolicy(1, 6, 1000, 1.0).desired(lag, current, partitions) == wanted


def test_pool_scales_up_at_once_and_down_after_calm_checks_and_restarts_dead_workers() -> None:
    lag = [50_000]
    pool = WorkerPool(lambda i: [sys.executable, "-c", "import time; time.sleep(60)"], 1,
                      ScalePolicy(1, 3, 1000, 0.1, calm_checks=2), lambda: (lag[0], 4))
    try:
        pool.reconcile()
        pool.autoscale()
        pool.reconcile()
        assert pool.target == 3 and pool.running == 3
        lag[0] = 0
        pool.autoscale()
        assert pool.target == 3  # one calm check is not enough
        pool.autoscale()
        pool.reconcile()
        assert pool.target == 2 and pool.running == 2
        pool.procs[0].kill()
        pool.procs[0].wait()
        pool.reconcile()
        assert pool.running == 2
    finally:
        pool.stop_event.set()
        pool.run()
    assert pool.running == 0


@pytest.fixture()
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'obs.db'}"
    engine = make_engine(url)
    store.metadata.create_all(engine)
    engine.dispose()
    return url


def fill_logs(db_url: str) -> None:
    engine = make_engine(db_url)

    def handler(event: dict[str, Any], context: Context) -> None:
        recs = event_records(event)
        context.logger.info("batch of %d", len(recs))
        if any(r["json"].get("bad") for r in recs):
            raise ValueError("bad record")

    from functions.config import FunctionConfig
    fn = FunctionConfig(name="obs", handler="functions.examples:noop", source_topics=["in"], batch_size=5,
                        maximum_retry_attempts=0, filter_criteria=[{"value": {"skip": [{"exists": False}]}}])
    values = [{"i": i, "bad": i == 7} for i in range(10)] + [{"skip": 1}] * 3
    run_local(fn, handler, MemorySource.of("in", values), sessions=make_sessions(engine))
    engine.dispose()


def test_stats_count_invocations_errors_on_failure_and_filtered(db_url: str) -> None:
    fill_logs(db_url)
    engine = make_engine(db_url)
    with make_sessions(engine)() as session:
        st = function_stats(session, "obs")
        rows = list(session.execute(select(store.fn_invocations).order_by(store.fn_invocations.c.id)))
    engine.dispose()
    assert st["records_on_failure"] == 1 and st["records_filtered"] == 3
    # [0-4] ok, [5-9] fails, halves [5,6] ok and [7,8,9] fails, [7] fails (on-failure), [8,9] ok
    assert (st["invocations"], st["errors"], st["records_processed"]) == (6, 3, 9)
    assert st["duration_p50_ms"] is not None and st["duration_p99_ms"] >= st["duration_p50_ms"]
    invocation = next(r for r in rows if r.outcome == "ok")
    lines = log_lines(invocation)
    assert lines[0].split()[1:3] == ["START", "RequestId:"] and "INFO batch of 5" in lines[1]
    assert lines[-1].split()[1] == "REPORT" and "Outcome: ok" in lines[-1] and "IteratorAge:" in lines[-1]
    failed = next(r for r in rows if r.outcome == "RetryAttemptsExhausted")
    assert "RETRYATTEMPTSEXHAUSTED Records: 1" in log_lines(failed)[0]


def test_prometheus_text_has_one_series_per_metric_and_label() -> None:
    st = {"function": "f", "invocations": 3, "errors": 1, "timeouts": 0, "records_on_failure": 2,
          "records_filtered": 0, "duration_p50_ms": 12.0, "duration_p99_ms": 40.0, "iterator_age_ms": 1500}
    text = prometheus_text([st], {"f": {("t", 0): 5, ("t", 1): 0}}, {"f": 2})
    assert 'fleetwatch_function_invocations_total{function="f"} 3' in text
    assert 'fleetwatch_function_duration_seconds_p99{function="f"} 0.04' in text
    assert 'fleetwatch_function_iterator_age_seconds{function="f"} 1.5' in text
    assert 'fleetwatch_function_offset_lag{function="f",topic="t",partition="0"} 5' in text
    assert 'fleetwatch_function_workers{function="f"} 2' in text
    assert text.count("# TYPE") == 10


def test_cli_logs_print_start_end_report(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fill_logs(db_url)
    fns = write(tmp_path / "f.toml", '[[function]]\nname = "obs"\nhandler = "functions.examples:noop"\n'
                                     'source_topics = ["in"]\n')
    monkeypatch.setenv("FLEETWATCH_FUNCTIONS_FILE", str(fns))
    monkeypatch.setenv("FLEETWATCH_DATABASE_URL", db_url)
    result = runner.invoke(app, ["functions", "logs", "obs", "--limit", "50"])
    assert result.exit_code == 0, result.output
    words = [line.split()[1] for line in result.output.splitlines()]
    assert words.count("START") == words.count("END") == words.count("REPORT") >= 4
    assert "RETRYATTEMPTSEXHAUSTED" in words and "FILTERED" in words
    unknown = runner.invoke(app, ["functions", "logs", "nope"])
    assert unknown.exit_code == 2 and "no function 'nope'" in unknown.output


def test_cli_invoke_runs_a_handler_on_a_sample_event_without_a_broker(tmp_path: Path, db_url: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    fns = write(tmp_path / "f.toml", '[[function]]\nname = "sum"\nhandler = "functions.examples:window_sum"\n'
                                     'source_topics = ["in"]\ntransactional = false\n')
    monkeypatch.setenv("FLEETWATCH_FUNCTIONS_FILE", str(fns))
    monkeypatch.setenv("FLEETWATCH_DATABASE_URL", db_url)
    event = write(tmp_path / "event.json", json.dumps({"records": {"in-0": [
        {"offset": 0, "json": {"n": 2}}, {"offset": 1, "value": "eyJuIjogNX0="}]}, "state": {"count": 1, "sum": 1}}))
    result = runner.invoke(app, ["functions", "invoke", "sum", "--event", str(event)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["records"] == 2 and out["response"] == {"state": {"count": 3, "sum": 8}}
    as_list = write(tmp_path / "list.json", json.dumps([{"n": 1}, {"n": 1}]))
    result = runner.invoke(app, ["functions", "invoke", "sum", "--event", str(as_list)])
    assert json.loads(result.output)["response"] == {"state": {"count": 2, "sum": 2}}
    bad = write(tmp_path / "bad.json", json.dumps({"records": {"in-0": [{"offset": 0}]}}))
    result = runner.invoke(app, ["functions", "invoke", "sum", "--event", str(bad)])
    assert result.exit_code == 2 and "needs a base64" in result.output


def test_cli_invoke_reports_a_handler_error_with_exit_code_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fns = write(tmp_path / "f.toml", '[[function]]\nname = "rows"\nhandler = "functions.examples:store_rows"\n'
                                     'source_topics = ["in"]\ntransactional = false\n[function.params]\ntable = "x"\n')
    monkeypatch.setenv("FLEETWATCH_FUNCTIONS_FILE", str(fns))
    event = write(tmp_path / "event.json", json.dumps([{"n": 1}]))
    result = runner.invoke(app, ["functions", "invoke", "rows", "--event", str(event)])
    assert result.exit_code == 1
    assert json.loads(result.output)["errorType"] == "AssertionError"


def test_cli_list_shows_every_declared_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    result = runner.invoke(app, ["functions", "list"])
    assert result.exit_code == 0 and "trends-detect" in result.output and "ordering-place" in result.output
    monkeypatch.setenv("FLEETWATCH_FUNCTIONS_FILE", str(write(tmp_path / "f.toml", "nothing = 1\n")))
    result = runner.invoke(app, ["functions", "list"])
    assert result.exit_code == 2 and "expected one or more [[function]] tables" in result.output


def test_time_is_not_wasted_in_the_unit_suite() -> None:
    started = time.monotonic()
    run_local(load_functions(Path(__file__).parents[2] / "fleetwatch" / "functions.toml")["ordering-place"]
              .model_copy(update={"transactional": False}), lambda e, c: None, MemorySource.of("in", [{}] * 10))
    assert time.monotonic() - started < 5

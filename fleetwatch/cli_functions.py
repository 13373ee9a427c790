"""``fleetwatch functions``: run, list, invoke and inspect Lambda-style functions."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from fleetwatch.common import console, err, fail, get_settings, setup_logging
from fleetwatch.settings import Settings

if TYPE_CHECKING:
    from functions.config import FunctionConfig

functions_app = typer.Typer(help="Lambda-style functions over Kafka.", no_args_is_help=True)


def _functions(s: Settings) -> dict[str, FunctionConfig]:
    from functions.config import ConfigError, load_functions

    try:
        return load_functions(s.functions_path)
    except ConfigError as exc:
        fail(escape(str(exc)))
        raise  # unreachable: fail() exits


def _function(s: Settings, name: str) -> FunctionConfig:
    functions = _functions(s)
    if name not in functions:
        fail(f"no function {name!r}; declared: {', '.join(functions)}")
    return functions[name]


def _render_metrics(s: Settings, names: list[str], workers: dict[str, int] | None = None) -> str:
    from functions.db import make_engine, make_sessions
    from functions.observe import function_stats, offset_lag, prometheus_text

    functions = _functions(s)
    engine = make_engine(s.db_url)
    try:
        with make_sessions(engine)() as session:
            stats = [function_stats(session, n) for n in names]
            lags = {n: offset_lag(s.bootstrap, session, s.topic(functions[n].group),
                                  [s.topic(t) for t in functions[n].source_topics],
                                  kafka_committed=not functions[n].transactional) for n in names}
    finally:
        engine.dispose()
    return prometheus_text(stats, lags, workers)


@functions_app.command("run")
def functions_run(
    name: str,
    workers: Annotated[int | None, typer.Option(min=1, max=64, help="consumer-group members (processes); "
                                                "default: the function's workers_min")] = None,
    autoscale: Annotated[bool, typer.Option(help="add/remove workers between workers_min and workers_max "
                                            "from offset lag")] = False,
    metrics_port: Annotated[int, typer.Option(help="serve Prometheus metrics on this port (0: off)")] = 0,
    worker_id: Annotated[str | None, typer.Option(hidden=True)] = None,
) -> None:
    """Run function NAME: one or more members of its consumer group."""
    setup_logging()
    s = get_settings()
    fn = _function(s, name)
    count = workers or fn.workers_min
    server = None
    pool_ref: list[Any] = []
    if metrics_port:
        from functions.observe import Cached, serve_metrics

        def render() -> str:
            running = pool_ref[0].running if pool_ref else 1
            return _render_metrics(s, [name], {name: running})

        try:
            server = serve_metrics(metrics_port, Cached(render), s.api_host)
        except OSError as exc:
            fail(f"cannot serve metrics on port {metrics_port}: {exc}")
    try:
        if count == 1 and not autoscale:
            _run_member(s, fn, worker_id)
        else:
            _run_pool(s, fn, count, autoscale, pool_ref)
    finally:
        if server is not None:
            server.shutdown()


def _run_member(s: Settings, fn: FunctionConfig, worker_id: str | None) -> None:
    from functions.db import make_engine, make_sessions
    from functions.worker import KafkaWorker, tune_gc

    engine = make_engine(s.db_url)
    try:
        worker = KafkaWorker(fn, s.bootstrap, make_sessions(engine), s.topic_prefix, worker_id=worker_id)
    except ImportError as exc:
        fail(str(exc))
    tune_gc(s.functions_gc_full_every)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop_event.set())
    try:
        worker.run()
    finally:
        worker.close()
        engine.dispose()


def _run_pool(s: Settings, fn: FunctionConfig, count: int, autoscale: bool, pool_ref: list[Any]) -> None:
    import os

    from functions.db import make_engine, make_sessions
    from functions.observe import offset_lag
    from functions.pool import ScalePolicy, WorkerPool

    def command(i: int) -> list[str]:
        return [sys.executable, "-m", "fleetwatch.cli", "functions", "run", fn.name, "--workers", "1",
                "--worker-id", f"{os.uname().nodename}:{os.getpid()}/{i}"]

    def lag() -> tuple[int, int]:
        engine = make_engine(s.db_url)
        try:
            with make_sessions(engine)() as session:
                per = offset_lag(s.bootstrap, session, s.topic(fn.group), [s.topic(t) for t in fn.source_topics],
                                 kafka_committed=not fn.transactional)
        finally:
            engine.dispose()
        return sum(per.values()), len(per)

    policy = None
    if autoscale:
        policy = ScalePolicy(fn.workers_min, max(fn.workers_max, count), fn.scale_lag_per_worker, fn.scale_interval_s)
        count = max(count, fn.workers_min)
    pool = WorkerPool(command, count, policy, lag if autoscale else None)
    pool_ref.append(pool)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: pool.stop_event.set())
    pool.run()


@functions_app.command("list")
def functions_list() -> None:
    """Show declared functions and their mapping options."""
    s = get_settings()
    table = Table("name", "handler", "sources", "batch", "window s", "retries", "max age s", "bisect",
                  "on failure", "filters", "tumbling s", "timeout s", "workers")
    for fn in _functions(s).values():
        table.add_row(fn.name, fn.handler, ",".join(fn.source_topics), str(fn.batch_size),
                      f"{fn.maximum_batching_window_s:g}", str(fn.maximum_retry_attempts),
                      str(fn.maximum_record_age_s), "yes" if fn.bisect_batch_on_error else "no", fn.failure_topic,
                      str(len(fn.filter_criteria)), str(fn.tumbling_window_s), f"{fn.timeout_s:g}",
                      f"{fn.workers_min}-{fn.workers_max}")
    console.print(table)


@functions_app.command("logs")
def functions_logs(
    name: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new invocations")] = False,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="invocations to show")] = 20,
) -> None:
    """Print START / END / REPORT lines of the latest invocations of NAME."""
    from sqlalchemy.exc import SQLAlchemyError

    from functions.db import make_engine, make_sessions
    from functions.observe import log_lines, recent_logs

    s = get_settings()
    _function(s, name)
    engine = make_engine(s.db_url)
    sessions = make_sessions(engine)
    last = 0
    try:
        while True:
            with sessions() as session:
                rows = recent_logs(session, name, last, limit if not last else 1000)
            for row in rows:
                for line in log_lines(row):
                    print(line, flush=True)
                last = max(last, int(row.id))
            if not follow:
                return
            if not last:
                last = -1  # nothing yet: from now on print everything new
            time.sleep(1.0)
    except SQLAlchemyError as exc:
        fail(f"cannot read invocation logs from {s.db_url}: {str(exc).splitlines()[0]} (run `fleetwatch db upgrade`?)")
    except KeyboardInterrupt:
        pass
    finally:
        engine.dispose()


@functions_app.command("stats")
def functions_stats(
    name: Annotated[str | None, typer.Argument(help="one function (default: all)")] = None,
    output: Annotated[str, typer.Option("--format", help="table, json or prometheus")] = "table",
) -> None:
    """Invocations, errors, duration p50/p99, iterator age, offset lag, on-failure records per function."""
    from kafka.errors import KafkaError
    from sqlalchemy.exc import SQLAlchemyError

    from functions.db import make_engine, make_sessions
    from functions.observe import function_stats, offset_lag, prometheus_text

    s = get_settings()
    functions = _functions(s)
    names = [_function(s, name).name] if name else list(functions)
    if output not in ("table", "json", "prometheus"):
        fail("--format must be table, json or prometheus")
    engine = make_engine(s.db_url)
    try:
        with make_sessions(engine)() as session:
            stats = [function_stats(session, n) for n in names]
            lags: dict[str, dict[tuple[str, int], int]] = {}
            for n in names:
                fn = functions[n]
                try:
                    lags[n] = offset_lag(s.bootstrap, session, s.topic(fn.group),
                                         [s.topic(t) for t in fn.source_topics], kafka_committed=not fn.transactional)
                except KafkaError as exc:
                    err.print(f"[yellow]warning:[/yellow] offset lag of {n} unknown: Kafka unreachable ({exc})")
    except SQLAlchemyError as exc:
        fail(f"cannot read statistics from {s.db_url}: {str(exc).splitlines()[0]} (run `fleetwatch db upgrade`?)")
    finally:
        engine.dispose()
    for st in stats:
        st["offset_lag"] = sum(lags[st["function"]].values()) if st["function"] in lags else None
    if output == "json":
        print(json.dumps(stats, indent=2))
        return
    if output == "prometheus":
        print(prometheus_text(stats, lags), end="")
        return
    table = Table("function", "invocations", "errors", "timeouts", "p50 ms", "p99 ms", "iterator age s",
                  "offset lag", "on-failure", "filtered")
    fmt = lambda v, f="{:.1f}": "—" if v is None else f.format(v)  # noqa: E731
    for st in stats:
        table.add_row(st["function"], str(st["invocations"]), str(st["errors"]), str(st["timeouts"]),
                      fmt(st["duration_p50_ms"]), fmt(st["duration_p99_ms"]),
                      fmt(st["iterator_age_ms"] / 1000 if st["iterator_age_ms"] is not None else None),
                      fmt(st["offset_lag"], "{}"), str(st["records_on_failure"]), str(st["records_filtered"]))
    console.print(table)


@functions_app.command("invoke")
def functions_invoke(
    name: str,
    event: Annotated[Path, typer.Option(help="JSON file: a Lambda Kafka event or a list of values", exists=True,
                                        dir_okay=False, readable=True)],
    commit: Annotated[bool, typer.Option(help="commit the handler's database writes (default: roll back)")] = False,
) -> None:
    """Run NAME's handler once on a sample event, with no broker; print its response and emitted messages."""
    from functions.db import make_engine, make_sessions
    from functions.local import invoke_once, records_from_event
    from functions.runtime import load_handler

    s = get_settings()
    fn = _function(s, name)
    try:
        doc = json.loads(event.read_text())
        records = records_from_event(doc, s.topic(fn.source_topics[0]))
    except (ValueError, UnicodeDecodeError) as exc:
        fail(escape(f"{event}: {exc}"))
    extra = {k: v for k, v in doc.items() if k not in ("records", "eventSource")} if isinstance(doc, dict) else None
    try:
        handler = load_handler(fn.handler)
    except ImportError as exc:
        fail(escape(str(exc)))
    engine = make_engine(s.db_url) if fn.transactional else None
    session = make_sessions(engine)() if engine is not None else None
    started = time.monotonic()
    try:
        response, ctx = invoke_once(fn, handler, records, session, extra)
        if session is not None:
            session.commit() if commit else session.rollback()
    except Exception as exc:  # noqa: BLE001 - report the handler's error like Lambda's invoke does
        if session is not None:
            session.rollback()
        print(json.dumps({"errorType": type(exc).__name__, "errorMessage": str(exc)}, indent=2))
        raise typer.Exit(1) from None
    finally:
        if session is not None:
            session.close()
        if engine is not None:
            engine.dispose()
    print(json.dumps({
        "function": fn.name, "records": len(records), "duration_ms": round((time.monotonic() - started) * 1000, 2),
        "response": response, "metrics": dict(ctx.metrics.counters), "committed": bool(commit and session),
        "emitted": [{"topic": e.topic, "key": e.key.decode("utf-8", "replace") if e.key else None,
                     "value": e.value if isinstance(e.value, dict) else e.value.decode("utf-8", "replace")}
                    for e in ctx.emitted],
    }, indent=2, default=str))

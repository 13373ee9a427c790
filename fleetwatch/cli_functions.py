"""``fleetwatch functions``: run, list and inspect Lambda-style functions."""

from __future__ import annotations

import signal

import typer
from rich.table import Table

from fleetwatch.common import console, fail, get_settings, setup_logging

functions_app = typer.Typer(help="Lambda-style functions over Kafka.", no_args_is_help=True)


@functions_app.command("run")
def functions_run(name: str) -> None:
    """Run one worker of function NAME in its consumer group."""
    from functions.config import ConfigError, load_functions
    from functions.db import make_engine, make_sessions
    from functions.worker import KafkaWorker

    setup_logging()
    s = get_settings()
    try:
        functions = load_functions(s.functions_path)
    except ConfigError as exc:
        fail(str(exc))
    if name not in functions:
        fail(f"no function {name!r}; declared: {', '.join(functions)}")
    engine = make_engine(s.db_url)
    worker = KafkaWorker(functions[name], s.bootstrap, make_sessions(engine), s.topic_prefix)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop_event.set())
    try:
        worker.run()
    finally:
        worker.close()
        engine.dispose()


@functions_app.command("list")
def functions_list() -> None:
    """Show declared functions and their mapping options."""
    from functions.config import ConfigError, load_functions

    try:
        functions = load_functions(get_settings().functions_path)
    except ConfigError as exc:
        fail(str(exc))
    table = Table("name", "handler", "sources", "batch", "retries", "on failure")
    for fn in functions.values():
        table.add_row(fn.name, fn.handler, ",".join(fn.source_topics), str(fn.batch_size),
                      str(fn.maximum_retry_attempts), fn.failure_topic)
    console.print(table)

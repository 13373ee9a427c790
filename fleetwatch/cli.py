"""The ``fleetwatch`` command line: stack control, workers, simulator, orders, demo."""

from __future__ import annotations

import csv
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fleetwatch.settings import Settings, get_settings

app = typer.Typer(help="Fleetwatch: streaming predictive maintenance for tractor fleets.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
ingest_app = typer.Typer(help="The MQTT→Kafka ingest bridge.", no_args_is_help=True)
functions_app = typer.Typer(help="Lambda-style functions over Kafka.", no_args_is_help=True)
orders_app = typer.Typer(help="Replacement-part orders.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
api_app = typer.Typer(help="REST API and operator web page.", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")
app.add_typer(functions_app, name="functions")
app.add_typer(orders_app, name="orders")
app.add_typer(db_app, name="db")
app.add_typer(api_app, name="api")

console = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("kafka").setLevel(logging.WARNING)


# ------------------------------------------------------------------ stack
@app.command()
def install() -> None:
    """Install Mosquitto and PostgreSQL (Debian packages) and fetch the Kafka jars (Maven Central) if missing."""
    from fleetwatch.stack import Stack, StackError

    stack = Stack(get_settings())
    try:
        stack.ensure_debian_packages()
        with console.status("fetching Kafka jars from Maven Central (first time only)"):
            libs = stack.kafka_libs()
    except StackError as exc:
        _fail(str(exc))
    console.print(f"Mosquitto and PostgreSQL installed; Kafka jars in {libs}")


@app.command()
def up(workers: Annotated[bool, typer.Option(help="also start bridge, functions and API")] = True) -> None:
    """Install what is missing, start Kafka, Mosquitto (and PostgreSQL when used), migrate, start workers."""
    from fleetwatch.db import upgrade
    from fleetwatch.pipeline import ensure_topics
    from fleetwatch.stack import Stack, StackError

    s = get_settings()
    stack = Stack(s)
    try:
        stack.ensure_debian_packages()
        infra = ["kafka", "mosquitto"]
        if s.db_url.startswith("postgresql") and f":{s.pg_port}/" in s.db_url:
            infra.append("postgres")
        with console.status("starting " + ", ".join(infra)):
            stack.start(infra)
            ensure_topics(s)
            upgrade(s.db_url)
        if workers:
            with console.status("starting bridge, functions and API"):
                stack.start(["bridge", "fn-trends", "fn-ordering", "api"])
    except StackError as exc:
        _fail(str(exc))
    status()


@app.command()
def down() -> None:
    """Stop every process of the local stack."""
    from fleetwatch.stack import Stack

    Stack(get_settings()).down()
    console.print("stack stopped")


@app.command()
def status() -> None:
    """Report each component's state."""
    from fleetwatch.stack import Stack

    s = get_settings()
    table = Table("component", "state", title=f"Fleetwatch stack ({s.run_dir})")
    for name, state in Stack(s).status().items():
        table.add_row(name, f"[green]{state}[/green]" if state == "RUNNING" else state)
    console.print(table)
    console.print(f"Kafka {s.bootstrap} · MQTT {s.mqtt_host}:{s.mqtt_port} · DB {s.db_url} · "
                  f"operator page http://{s.api_host}:{s.api_port}/")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply migrations and seed the parts catalog."""
    from fleetwatch.db import upgrade

    s = get_settings()
    upgrade(s.db_url)
    console.print(f"schema up to date at {s.db_url}")


# ------------------------------------------------------------------ workers
@ingest_app.command("run")
def ingest_run() -> None:
    """Run one bridge process (MQTT → Kafka)."""
    from datetime import timedelta

    from ingest.bridge import Bridge, BridgeConfig
    from ingest.validate import Limits

    _logging()
    s = get_settings()
    limits = Limits(max_payload_bytes=s.max_payload_bytes, max_samples=s.max_samples_per_message,
                    max_future_skew=timedelta(seconds=s.max_future_skew_s), max_age=timedelta(days=s.max_age_days))
    config = BridgeConfig(mqtt_host=s.mqtt_host, mqtt_port=s.mqtt_port, bootstrap=s.bootstrap,
                          telemetry_topic=s.topic("telemetry"), dlq_topic=s.topic("telemetry.dlq"),
                          client_id=f"{s.mqtt_client_prefix}-{s.topic_prefix}bridge", limits=limits,
                          session_expiry_s=s.mqtt_session_expiry_s)
    Bridge(config).run()


@functions_app.command("run")
def functions_run(name: str) -> None:
    """Run one worker of function NAME in its consumer group."""
    from functions.config import ConfigError, load_functions
    from functions.db import make_engine, make_sessions
    from functions.worker import KafkaWorker

    _logging()
    s = get_settings()
    try:
        functions = load_functions(s.functions_path)
    except ConfigError as exc:
        _fail(str(exc))
    if name not in functions:
        _fail(f"no function {name!r}; declared: {', '.join(functions)}")
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
        _fail(str(exc))
    table = Table("name", "handler", "sources", "batch", "retries", "on failure")
    for fn in functions.values():
        table.add_row(fn.name, fn.handler, ",".join(fn.source_topics), str(fn.batch_size),
                      str(fn.maximum_retry_attempts), fn.failure_topic)
    console.print(table)


@api_app.command("serve")
def api_serve() -> None:
    """Serve the REST API and operator page."""
    import uvicorn

    from functions.db import make_engine, make_sessions
    from ordering.api import create_app

    s = get_settings()
    uvicorn.run(create_app(make_sessions(make_engine(s.db_url))), host=s.api_host, port=s.api_port,
                log_level="warning")


# ------------------------------------------------------------------ simulator
def _simulate(s: Settings, scenario: str, tractors: int, days: float, seed: int, period_s: float,
              truth: Path | None, speed: float, degrading: int) -> tuple[int, dict[str, object]]:
    from simulators.fleet import start_for
    from simulators.publish import Gateway, run_fleet
    from simulators.scenarios import ScenarioError, build

    try:
        fleet = build(scenario, tractors, days, seed, start_for(days), degrading=degrading)
    except ScenarioError as exc:
        _fail(str(exc))
    ground_truth = fleet.truth(scenario, seed, days, period_s)
    if truth:
        truth.write_text(json.dumps(ground_truth, indent=2))
    gateway = Gateway(s.mqtt_host, s.mqtt_port, f"{s.mqtt_client_prefix}-sim-{seed}-{time.time_ns()}")
    try:
        with Progress(TextColumn("[bold]simulating[/bold] {task.description}"), BarColumn(),
                      TextColumn("{task.percentage:>5.1f}% · {task.fields[msgs]} messages"), TimeElapsedColumn(),
                      console=err, transient=False) as bar:
            task = bar.add_task(f"{tractors} tractors × {days:g} days", total=1.0, msgs=0)
            result = run_fleet(fleet, gateway, days, period_s, speed,
                               progress=lambda frac, n: bar.update(task, completed=frac, msgs=n))
    finally:
        gateway.close()
    err.print(f"published {result.messages} messages ({result.readings} readings) in {result.seconds:.1f}s")
    return result.messages, ground_truth


@app.command()
def simulate(
    scenario: Annotated[str, typer.Option(help="oil-pump-demo | healthy")] = "oil-pump-demo",
    tractors: Annotated[int, typer.Option(min=1)] = 20,
    days: Annotated[float, typer.Option(min=1.01)] = 20.0,
    seed: int = 7,
    period_s: Annotated[float, typer.Option("--period", min=1, help="simulated seconds between samples")] = 600.0,
    degrading: Annotated[int, typer.Option(min=0, help="tractors whose part wears")] = 1,
    speed: Annotated[float, typer.Option(min=0, help="simulated s per wall s; 0 = as fast as possible")] = 0.0,
    truth: Annotated[Path | None, typer.Option(help="write ground truth JSON here")] = None,
) -> None:
    """Publish a simulated fleet to MQTT (QoS 1) with an accelerated clock."""
    _simulate(get_settings(), scenario, tractors, days, seed, period_s, truth, speed, degrading)


# ------------------------------------------------------------------ orders
def _orders_rows(s: Settings) -> list[dict[str, object]]:
    from sqlalchemy import select

    from functions.db import make_engine
    from ordering.tables import orders

    engine = make_engine(s.db_url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(orders).order_by(orders.c.id))]
    finally:
        engine.dispose()


@orders_app.command("list")
def orders_list(fmt: Annotated[str, typer.Option("--format", help="table | csv | json")] = "table") -> None:
    """Print the orders table."""
    if fmt not in ("table", "csv", "json"):
        _fail("--format must be table, csv or json")
    rows = _orders_rows(get_settings())
    columns = ["id", "tractor_id", "part_id", "status", "priority", "ttf_h", "alert_count", "placed_at", "cost_eur"]
    if fmt == "json":
        console.print_json(json.dumps(rows, default=str))
        return
    if fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return
    table = Table(*columns, title=f"{len(rows)} orders")
    for r in rows:
        table.add_row(*[f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in columns])
    console.print(table)


# ------------------------------------------------------------------ demo
@app.command()
def demo(
    tractors: Annotated[int, typer.Option(min=2)] = 24,
    days: Annotated[float, typer.Option(min=5)] = 20.0,
    seed: int = 7,
    degrading: Annotated[int, typer.Option(min=1)] = 2,
) -> None:
    """Start the stack, run a simulated fleet, and show the placed orders next to the ground truth."""
    from fleetwatch.pipeline import end_offsets, wait_drained

    s = get_settings()
    up(workers=True)
    baseline = sum(end_offsets(s, s.topic("telemetry")).values())
    published, truth = _simulate(s, "oil-pump-demo", tractors, days, seed, 600.0, s.run_dir / "truth.json", 0.0,
                                 degrading)
    with console.status("waiting for trends and orders") as st:
        wait_drained(s, published, baseline, timeout=900, report=lambda m: st.update(m))
    rows = _orders_rows(s)
    table = Table("tractor", "part", "injected wear (ground truth)", "would fail at", "order", "wear detected at",
                  "forecast to failure", title="Orders vs ground truth")
    wear = {(w["tractor_id"], w["part_id"]): w for w in truth["wear"]}  # type: ignore[index]
    keys = sorted(set(wear) | {(r["tractor_id"], r["part_id"]) for r in rows})
    by_key = {(r["tractor_id"], r["part_id"]): r for r in rows}
    for key in keys:
        w, o = wear.get(key), by_key.get(key)
        table.add_row(key[0], key[1], f"{w['kind']} from {w['onset'][:10]}" if w else "[red]none[/red]",
                      w["failure_time"][:16] if w else "—", f"#{o['id']} {o['status']}" if o else "[red]missed[/red]",
                      str(o["evidence"].get("first_detected_at", ""))[:16] if o else "—",
                      f"{o['ttf_h'] / 24:.1f} d" if o and o["ttf_h"] is not None else "—")
    console.print(table)
    console.print(f"Operator page: [bold]http://{s.api_host}:{s.api_port}/[/bold]  (stop everything: fleetwatch down)")


def main() -> None:
    """Entry point for ``python -m fleetwatch.cli``."""
    app()


if __name__ == "__main__":
    main()

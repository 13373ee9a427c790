"""The ``fleetwatch`` command line: stack control, workers, simulator, orders, demo."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from fleetwatch.cli_chaos import chaos_app
from fleetwatch.cli_functions import functions_app
from fleetwatch.cli_ingest import devices_app, ingest_app, print_status
from fleetwatch.cli_orders import api_app, demo_token_path, orders_app, orders_rows, tokens_app
from fleetwatch.cli_sim import run_simulation, sim_app
from fleetwatch.cli_trends import evaluate_app, trends_app
from fleetwatch.common import console, fail, get_settings

app = typer.Typer(help="Fleetwatch: streaming predictive maintenance for tractor fleets.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(sim_app)
app.add_typer(ingest_app, name="ingest")
app.add_typer(devices_app, name="devices")
app.add_typer(functions_app, name="functions")
app.add_typer(orders_app, name="orders")
app.add_typer(db_app, name="db")
app.add_typer(api_app, name="api")
app.add_typer(tokens_app, name="tokens")
app.add_typer(chaos_app)
app.add_typer(trends_app, name="trends")
app.add_typer(evaluate_app)

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
        fail(str(exc))
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
        fail(str(exc))
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
    print_status(s)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply migrations and seed the parts catalog."""
    from fleetwatch.db import upgrade

    s = get_settings()
    upgrade(s.db_url)
    console.print(f"schema up to date at {s.db_url}")


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
    published, truth = run_simulation(s, "oil-pump-demo", tractors, days, seed, 600.0, s.run_dir / "truth.json", 0.0,
                                 degrading)
    with console.status("waiting for trends and orders") as st:
        wait_drained(s, published, baseline, timeout=900, report=lambda m: st.update(m))
    rows = orders_rows(s)
    table = Table("tractor", "part", "wear (truth)", "fails at", "order", "detected at", "lead",
                  title="Orders vs ground truth (event time, UTC)")
    wear = {(w["tractor_id"], w["part_id"]): w for w in truth["wear"]}  # type: ignore[index]
    keys = sorted(set(wear) | {(r["tractor_id"], r["part_id"]) for r in rows})
    by_key = {(r["tractor_id"], r["part_id"]): r for r in rows}
    for key in keys:
        w, o = wear.get(key), by_key.get(key)
        detected = str((o["evidence"] or {}).get("first_detected_at") or "") if o else ""
        lead = "—"
        if w and detected:
            days = (datetime.fromisoformat(w["failure_time"].replace("Z", "+00:00"))
                    - datetime.fromisoformat(detected.replace("Z", "+00:00"))).total_seconds() / 86400
            lead = f"{days:.1f} d before failure"
        order = f"#{o['id']} {o['status']}" if o else "[red]missed[/red]"
        table.add_row(key[0], key[1], w["kind"] if w else "[red]none[/red]",
                      _short(w["failure_time"]) if w else "—", order, _short(detected) if detected else "—", lead)
    console.print(table)
    token = demo_token_path(s)
    hint = f"log in with token {token.read_text().strip()} (from {token})" if token.exists() else \
        "create a token: fleetwatch tokens create --role operator"
    console.print(f"Operator page: [bold]http://{s.api_host}:{s.api_port}/[/bold]  {hint}  "
                  "(stop everything: fleetwatch down)", soft_wrap=True)


def _short(ts: str) -> str:
    """``2026-11-27T13:00:00.000Z`` as ``11-27 13:00`` for narrow tables."""
    return ts[5:16].replace("T", " ")


def main() -> None:
    """Entry point for ``python -m fleetwatch.cli``."""
    app()


if __name__ == "__main__":
    main()

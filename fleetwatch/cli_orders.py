"""``fleetwatch orders`` and ``fleetwatch api``: the order table, REST API and operator page."""

from __future__ import annotations

import csv
import json
import sys
from typing import Annotated

import typer
from rich.table import Table

from fleetwatch.common import console, fail, get_settings
from fleetwatch.settings import Settings

orders_app = typer.Typer(help="Replacement-part orders.", no_args_is_help=True)
api_app = typer.Typer(help="REST API and operator web page.", no_args_is_help=True)


@api_app.command("serve")
def api_serve() -> None:
    """Serve the REST API and operator page."""
    import uvicorn

    from functions.db import make_engine, make_sessions
    from ordering.api import create_app

    s = get_settings()
    uvicorn.run(create_app(make_sessions(make_engine(s.db_url))), host=s.api_host, port=s.api_port,
                log_level="warning")


def orders_rows(s: Settings) -> list[dict[str, object]]:
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
        fail("--format must be table, csv or json")
    rows = orders_rows(get_settings())
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

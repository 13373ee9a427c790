"""``fleetwatch orders``, ``fleetwatch tokens`` and ``fleetwatch api``: orders, API tokens, REST API and page."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fleetwatch.common import console, fail, get_settings, setup_logging
from fleetwatch.settings import Settings

orders_app = typer.Typer(help="Replacement-part orders and their lifecycle.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens (stored hashed; the secret is printed once).", no_args_is_help=True)
api_app = typer.Typer(help="REST API and operator web page.", no_args_is_help=True)
DEMO_TOKEN_FILE = "operator-token"


def _sessions(s: Settings) -> Any:
    from functions.db import make_engine, make_sessions

    return make_sessions(make_engine(s.db_url))


def demo_token_path(s: Settings) -> Path:
    """Where ``fleetwatch api serve`` keeps the demo operator token (mode 0600, never committed)."""
    return s.run_dir / DEMO_TOKEN_FILE


def ensure_demo_token(s: Settings, sessions: Any) -> str:
    """The demo operator token from the run folder, created (and stored hashed) when missing or revoked."""
    from ordering.auth import authenticate, create_token

    path = demo_token_path(s)
    with sessions() as session:
        if path.exists():
            secret = path.read_text().strip()
            if authenticate(session, secret) is not None:
                return secret
        _, secret = create_token(session, "operator", "demo operator")
        session.commit()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


@api_app.command("serve")
def api_serve() -> None:
    """Serve the REST API and operator page; relay operator changes to Kafka ``orders`` and send webhooks."""
    import uvicorn

    from ordering.api import create_app
    from ordering.dispatch import Dispatcher, WebhookConfig, kafka_producer_factory

    setup_logging()
    s = get_settings()
    sessions = _sessions(s)
    if s.api_demo_token:
        ensure_demo_token(s, sessions)
    dispatcher = None
    if s.api_relay:
        dispatcher = Dispatcher(sessions, kafka_producer_factory(s.bootstrap),
                                WebhookConfig(s.orders_webhook_url, s.orders_webhook_max_attempts,
                                              s.orders_webhook_timeout_s))
    uvicorn.run(create_app(sessions, topic_prefix=s.topic_prefix, dispatcher=dispatcher), host=s.api_host,
                port=s.api_port, log_level="warning")


def orders_rows(s: Settings, status: str | None = None) -> list[dict[str, Any]]:
    """Every order (optionally of one status), oldest first."""
    from sqlalchemy import select

    from functions.db import make_engine
    from ordering.tables import orders

    engine = make_engine(s.db_url)
    q = select(orders).order_by(orders.c.id)
    if status:
        q = q.where(orders.c.status == status)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]
    finally:
        engine.dispose()


@orders_app.command("list")
def orders_list(fmt: Annotated[str, typer.Option("--format", help="table | csv | json")] = "table",
                status: Annotated[str | None, typer.Option(help="only orders in this status")] = None) -> None:
    """Print the orders table."""
    from ordering.lifecycle import STATUSES

    if fmt not in ("table", "csv", "json"):
        fail("--format must be table, csv or json")
    if status is not None and status not in STATUSES:
        fail(f"--status must be one of {', '.join(STATUSES)}")
    rows = orders_rows(get_settings(), status)
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


@orders_app.command("show")
def orders_show(order_id: int) -> None:
    """Print one order with its evidence and history."""
    from sqlalchemy import select

    from ordering.lifecycle import order_document
    from ordering.tables import order_events, orders

    with _sessions(get_settings())() as session:
        row = session.execute(select(orders).where(orders.c.id == order_id)).first()
        if row is None:
            fail(f"order {order_id} not found", 1)
        events = session.execute(select(order_events).where(order_events.c.order_id == order_id)
                                 .order_by(order_events.c.id)).all()
        console.print_json(json.dumps({**order_document(row), "history": [order_document(e) for e in events]},
                                      default=str))


def _move(order_id: int, to: str, reason: str | None = None, code: str | None = None,
          note: str | None = None) -> None:
    from ordering.dispatch import API_SOURCE
    from ordering.lifecycle import IllegalTransition, InvalidTransition, OrderNotFound, outbox_emitter, transition

    s = get_settings()
    with _sessions(s)() as session:
        try:
            doc = transition(session, outbox_emitter(session, API_SOURCE, s.topic_prefix), order_id, to,
                             f"cli:{os.environ.get('USER', 'operator')}", reason=reason, cancel_code=code, note=note)
        except (OrderNotFound, IllegalTransition, InvalidTransition) as exc:
            fail(str(exc), 1)
        session.commit()
    console.print(f"order {order_id} is now [bold]{doc['status']}[/bold] (published by the API's relay)")


@orders_app.command("ack")
def orders_ack(order_id: int, note: Annotated[str | None, typer.Option()] = None) -> None:
    """Acknowledge a placed order."""
    _move(order_id, "acknowledged", note=note)


@orders_app.command("ship")
def orders_ship(order_id: int, note: Annotated[str | None, typer.Option()] = None) -> None:
    """Mark an acknowledged order as shipped."""
    _move(order_id, "shipped", note=note)


@orders_app.command("install")
def orders_install(order_id: int, note: Annotated[str | None, typer.Option()] = None) -> None:
    """Mark a shipped order's part as installed (resets that part's trend baseline)."""
    _move(order_id, "installed", note=note)


@orders_app.command("cancel")
def orders_cancel(order_id: int, reason: Annotated[str, typer.Option(help="why (kept for analysts)")],
                  code: Annotated[str, typer.Option(help="false_alarm | duplicate | not_needed | other")] = "other"
                  ) -> None:
    """Cancel an open order with a reason."""
    _move(order_id, "cancelled", reason=reason, code=code)


@tokens_app.command("create")
def tokens_create(role: Annotated[str, typer.Option(help="operator | analyst | admin")],
                  name: Annotated[str, typer.Option(help="who or what uses it")] = "cli") -> None:
    """Create an API token and print its secret (shown only this once)."""
    from ordering.auth import ROLES, create_token

    if role not in ROLES:
        fail(f"--role must be one of {', '.join(ROLES)}")
    if not name.strip() or len(name) > 100:
        fail("--name must be 1 to 100 characters")
    with _sessions(get_settings())() as session:
        token_id, secret = create_token(session, role, name.strip())
        session.commit()
    err_note = f"token #{token_id} ({role}, {name.strip()}); store it now, it is not kept in clear"
    print(secret)
    print(err_note, file=sys.stderr)


@tokens_app.command("list")
def tokens_list() -> None:
    """List tokens (never their secrets)."""
    from sqlalchemy import select

    from ordering.tables import api_tokens

    with _sessions(get_settings())() as session:
        rows = session.execute(select(api_tokens).order_by(api_tokens.c.id)).all()
    table = Table("id", "name", "role", "created", "revoked", title=f"{len(rows)} tokens")
    for r in rows:
        table.add_row(str(r.id), r.name, r.role, str(r.created_at)[:19], str(r.revoked_at or "")[:19])
    console.print(table)


@tokens_app.command("revoke")
def tokens_revoke(token_id: int) -> None:
    """Revoke a token."""
    from ordering.auth import revoke_token

    with _sessions(get_settings())() as session:
        if not revoke_token(session, token_id):
            fail(f"no active token {token_id}", 1)
        session.commit()
    console.print(f"token {token_id} revoked")

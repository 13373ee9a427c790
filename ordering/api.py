"""REST API and operator web page for orders (FastAPI, served by uvicorn)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ordering.place import order_document
from ordering.tables import order_events, orders, parts

STATIC = Path(__file__).with_name("static")
STATUSES = ("placed", "acknowledged", "shipped", "installed", "cancelled")


def create_app(sessions: sessionmaker[Session]) -> FastAPI:
    """The API bound to a session factory."""
    app = FastAPI(title="Fleetwatch orders", version="1",
                  description="Replacement-part orders placed from wear trends.")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return (STATIC / "index.html").read_text()

    @app.get("/api/orders")
    def list_orders(status: str | None = Query(None, description="filter by status"),
                    tractor_id: str | None = Query(None, max_length=32),
                    limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)) -> dict[str, Any]:
        """Orders, newest first."""
        if status is not None and status not in STATUSES:
            raise HTTPException(422, f"status must be one of {', '.join(STATUSES)}")
        q = select(orders).order_by(orders.c.placed_at.desc(), orders.c.id.desc())
        if status:
            q = q.where(orders.c.status == status)
        if tractor_id:
            q = q.where(orders.c.tractor_id == tractor_id)
        with sessions() as session:
            rows = session.execute(q.limit(limit).offset(offset)).all()
        return {"items": [order_document(r) for r in rows], "limit": limit, "offset": offset}

    @app.get("/api/orders/{order_id}")
    def get_order(order_id: int) -> dict[str, Any]:
        """One order with its history."""
        with sessions() as session:
            row = session.execute(select(orders).where(orders.c.id == order_id)).first()
            if row is None:
                raise HTTPException(404, f"order {order_id} not found")
            events = session.execute(select(order_events).where(order_events.c.order_id == order_id)
                                     .order_by(order_events.c.id)).all()
        return {**order_document(row), "history": [order_document(e) for e in events]}

    @app.get("/api/parts")
    def list_parts() -> list[dict[str, Any]]:
        """The parts catalog."""
        with sessions() as session:
            return [dict(r._mapping) for r in session.execute(select(parts).order_by(parts.c.part_id))]

    return app

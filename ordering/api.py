"""REST API and operator web page for orders, fleet health and trends (FastAPI, served by uvicorn)."""

import csv
import io
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from sqlalchemy import DateTime, Float, Integer, Select, String, and_, case, column, func, select, table, update
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ordering import auth, schemas
from ordering.dispatch import API_SOURCE, Dispatcher
from ordering.lifecycle import (
    OPEN_STATUSES,
    IllegalTransition,
    InvalidTransition,
    OrderNotFound,
    allowed_next,
    order_document,
    outbox_emitter,
    transition,
)
from ordering.tables import api_tokens, order_events, orders, parts

STATIC = Path(__file__).with_name("static")
CSP = ("default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'self'")
MAX_INT = 2**62  # keeps ids and offsets inside SQLite/PostgreSQL BIGINT

# Read-only views of the trend engineer's tables (ordering does not import trends).
_TS = DateTime(timezone=True)
part_health = table("part_health", column("tractor_id", String), column("part_id", String),
                    column("signal", String), column("level", Float), column("health", Float),
                    column("slope_per_h", Float), column("ttf_h", Float), column("ttf_lo_h", Float),
                    column("status", String), column("as_of", _TS))
trend_windows = table("trend_windows", column("tractor_id", String), column("signal", String),
                      column("window_start", _TS), column("window_end", _TS), column("count", Integer),
                      column("mean", Float), column("min", Float), column("max", Float), column("norm_value", Float),
                      column("slope_per_h", Float))

SORTS = {"placed_at": orders.c.placed_at, "updated_at": orders.c.updated_at, "priority": orders.c.priority,
         "ttf_h": orders.c.ttf_h, "tractor_id": orders.c.tractor_id, "part_id": orders.c.part_id,
         "status": orders.c.status, "cost_eur": orders.c.cost_eur, "expected_delivery": orders.c.expected_delivery}
OrderSort = Literal["placed_at", "-placed_at", "updated_at", "-updated_at", "priority", "-priority", "ttf_h",
                    "-ttf_h", "tractor_id", "-tractor_id", "part_id", "-part_id", "status", "-status", "cost_eur",
                    "-cost_eur", "expected_delivery", "-expected_delivery"]
CSV_COLUMNS = ["id", "tractor_id", "part_id", "signal", "status", "priority", "ttf_h", "alert_count", "placed_at",
               "updated_at", "expected_delivery", "cost_eur", "cancel_code", "cancel_reason"]
TractorId = Annotated[str, PathParam(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.:-]+$")]
bearer = HTTPBearer(auto_error=False, description="an API token from `fleetwatch tokens create --role …`")
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {401: {"model": schemas.Problem}, 403: {"model": schemas.Problem},
                                                   422: {"model": schemas.Problem}}


def _utc(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    try:
        return dt.astimezone(UTC) if dt.tzinfo else dt.replace(tzinfo=UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+14:00 has no UTC equivalent
        raise HTTPException(422, f"date-time {dt.isoformat()} is out of range once converted to UTC") from None


def _health_doc(row: Any) -> dict[str, Any]:
    doc = dict(row._mapping)
    doc.pop("tractor_id", None)
    doc["as_of"] = _utc(doc["as_of"]) if isinstance(doc["as_of"], datetime) else doc["as_of"]
    return doc


def create_app(sessions: sessionmaker[Session], topic_prefix: str = "", dispatcher: Dispatcher | None = None
               ) -> FastAPI:
    """The API bound to a session factory; ``dispatcher`` (relay + webhooks) runs for the app's lifetime."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if dispatcher:
            dispatcher.start()
        try:
            yield
        finally:
            if dispatcher:
                dispatcher.stop()

    # No /docs or /redoc: FastAPI's versions load Swagger UI from a CDN and the page must work offline;
    # the OpenAPI document itself is at /openapi.json.
    app = FastAPI(title="Fleetwatch orders", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Replacement-part orders placed from wear trends, their lifecycle, fleet part "
                              "health and trend series. Authenticate with `Authorization: Bearer <token>`; "
                              "roles: analyst (read), operator (read, act on orders), admin (also catalog, tokens).")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        # Everything the page needs comes from this app; nothing else may load or frame it.
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    # ------------------------------------------------------------- errors: 4xx with a message, never 500
    @app.exception_handler(RequestValidationError)
    async def invalid_input(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors(), custom_encoder={Exception: str})
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors)
        return JSONResponse({"detail": message or "invalid request", "errors": errors}, status_code=422)

    @app.exception_handler(OrderNotFound)
    async def not_found(_: Request, exc: OrderNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(IllegalTransition)
    async def conflict(_: Request, exc: IllegalTransition) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(InvalidTransition)
    async def invalid_transition(_: Request, exc: InvalidTransition) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(DataError)
    async def bad_value(_: Request, exc: DataError) -> JSONResponse:
        return JSONResponse({"detail": f"the database refused a value: {exc.orig}"}, status_code=422)

    @app.exception_handler(OperationalError)
    async def db_down(_: Request, exc: OperationalError) -> JSONResponse:
        return JSONResponse({"detail": "the database is unavailable; retry shortly"}, status_code=503)

    # ------------------------------------------------------------- auth
    def session_dep() -> Iterator[Session]:
        with sessions() as session:
            yield session

    SessionDep = Annotated[Session, Depends(session_dep)]

    def principal(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
                  session: SessionDep) -> auth.Principal:
        who = auth.authenticate(session, creds.credentials) if creds else None
        if who is None:
            raise HTTPException(401, "missing or invalid API token (send Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})
        return who

    def needs(right: str) -> Callable[..., auth.Principal]:
        def check(who: Annotated[auth.Principal, Depends(principal)]) -> auth.Principal:
            if not who.can(right):
                roles = [r for r, rights in auth.RIGHTS.items() if right in rights]
                raise HTTPException(403, f"role {who.role} may not do this (needs {' or '.join(roles)})")
            return who
        return check

    Reader = Annotated[auth.Principal, Depends(needs("read"))]
    Actor = Annotated[auth.Principal, Depends(needs("act"))]
    Admin = Annotated[auth.Principal, Depends(needs("admin"))]

    # ------------------------------------------------------------- page
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return (STATIC / "index.html").read_text()

    @app.get("/api/health", tags=["meta"])
    def health() -> dict[str, str]:
        """Liveness probe (no token needed)."""
        return {"status": "ok"}

    @app.get("/api/me", response_model=schemas.Me, tags=["meta"], responses=AUTH_RESPONSES)
    def me(who: Reader) -> dict[str, Any]:
        """The caller's token name, role and rights."""
        return {"token_id": who.token_id, "name": who.name, "role": who.role,
                "rights": sorted(auth.RIGHTS[who.role])}

    # ------------------------------------------------------------- orders
    def order_filters(
        status: Annotated[list[schemas.Status] | None, Query(description="repeat to match several")] = None,
        priority: Annotated[list[schemas.Priority] | None, Query()] = None,
        tractor_id: Annotated[str | None, Query(max_length=32)] = None,
        part_id: Annotated[str | None, Query(max_length=64)] = None,
        placed_from: Annotated[datetime | None, Query(description="placed at or after (ISO-8601)")] = None,
        placed_to: Annotated[datetime | None, Query(description="placed before (ISO-8601)")] = None,
    ) -> list[Any]:
        conds: list[Any] = []
        if status:
            conds.append(orders.c.status.in_(status))
        if priority:
            conds.append(orders.c.priority.in_(priority))
        if tractor_id:
            conds.append(orders.c.tractor_id == tractor_id)
        if part_id:
            conds.append(orders.c.part_id == part_id)
        if placed_from:
            conds.append(orders.c.placed_at >= _utc(placed_from))
        if placed_to:
            conds.append(orders.c.placed_at < _utc(placed_to))
        return conds

    Filters = Annotated[list[Any], Depends(order_filters)]

    def ordered(q: Select[Any], sort: str) -> Select[Any]:
        col = SORTS[sort.lstrip("-")]
        key = col.desc() if sort.startswith("-") else col.asc()
        return q.order_by(key.nulls_last(), orders.c.id.desc() if sort.startswith("-") else orders.c.id.asc())

    @app.get("/api/orders", response_model=schemas.OrderPage, tags=["orders"], responses=AUTH_RESPONSES)
    def list_orders(_: Reader, session: SessionDep, conds: Filters,
                    sort: Annotated[OrderSort, Query(description="column; '-' for descending")] = "-placed_at",
                    limit: Annotated[int, Query(ge=1, le=500)] = 50,
                    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0) -> dict[str, Any]:
        """Orders matching the filters, one page at a time, with the total count."""
        where = and_(True, *conds)
        total = session.execute(select(func.count()).select_from(orders).where(where)).scalar_one()
        rows = session.execute(ordered(select(orders).where(where), sort).limit(limit).offset(offset)).all()
        return {"items": [order_document(r) for r in rows], "total": total, "limit": limit, "offset": offset}

    @app.get("/api/orders.csv", tags=["orders"], response_class=Response, responses={
        200: {"content": {"text/csv": {}}, "description": "orders as CSV"}, **AUTH_RESPONSES})
    def export_orders(_: Reader, session: SessionDep, conds: Filters,
                      sort: Annotated[OrderSort, Query()] = "-placed_at") -> Response:
        """The orders matching the filters as a CSV file (all pages)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in session.execute(ordered(select(orders).where(and_(True, *conds)), sort)):
            writer.writerow(order_document(row))
        return Response(buf.getvalue(), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="orders.csv"'})

    def load_detail(session: Session, order_id: int) -> dict[str, Any]:
        row = session.execute(select(orders).where(orders.c.id == order_id)).first()
        if row is None:
            raise OrderNotFound(f"order {order_id} not found")
        events = session.execute(select(order_events).where(order_events.c.order_id == order_id)
                                 .order_by(order_events.c.id)).all()
        part = session.execute(select(parts).where(parts.c.part_id == row.part_id)).first()
        return {**order_document(row), "history": [order_document(e) for e in events],
                "part": dict(part._mapping) if part else None, "allowed_next": list(allowed_next(row.status))}

    OrderId = Annotated[int, PathParam(ge=1, le=MAX_INT)]

    @app.get("/api/orders/{order_id}", response_model=schemas.OrderDetail, tags=["orders"],
             responses={404: {"model": schemas.Problem}, **AUTH_RESPONSES})
    def get_order(order_id: OrderId, _: Reader, session: SessionDep) -> dict[str, Any]:
        """One order with its evidence, history (audit trail), catalog part and allowed next statuses."""
        return load_detail(session, order_id)

    @app.post("/api/orders/{order_id}/transitions", response_model=schemas.OrderDetail, tags=["orders"],
              responses={404: {"model": schemas.Problem}, 409: {"model": schemas.Problem}, **AUTH_RESPONSES})
    def change_status(order_id: OrderId, body: schemas.TransitionIn, who: Actor,
                      session: SessionDep) -> dict[str, Any]:
        """Move an order along placed → acknowledged → shipped → installed, or cancel it with a reason.

        Illegal moves answer 409. Installing records a part replacement, which resets that part's trend
        baseline. Every change is published on Kafka ``orders`` through the outbox."""
        transition(session, outbox_emitter(session, API_SOURCE, topic_prefix), order_id, body.to,
                   f"api:{who.name}", reason=body.reason, cancel_code=body.cancel_code, note=body.note)
        session.commit()
        if dispatcher:
            dispatcher.poke()
        return load_detail(session, order_id)

    # ------------------------------------------------------------- fleet and trends
    @app.get("/api/fleet", response_model=schemas.FleetSummary, tags=["fleet"], responses=AUTH_RESPONSES)
    def fleet(_: Reader, session: SessionDep) -> dict[str, Any]:
        """Fleet overview: number of tractors, per part how many are ok / warning / alert, open orders."""
        tractors_n = session.execute(select(func.count(func.distinct(part_health.c.tractor_id)))).scalar_one()
        counts: dict[str, dict[str, int]] = {}
        for part_id, status, n in session.execute(select(part_health.c.part_id, part_health.c.status, func.count())
                                                  .group_by(part_health.c.part_id, part_health.c.status)):
            counts.setdefault(part_id, {"ok": 0, "warning": 0, "alert": 0})[status] = n
        open_orders = {s: 0 for s in OPEN_STATUSES}
        for status, n in session.execute(select(orders.c.status, func.count()).where(
                orders.c.status.in_(OPEN_STATUSES)).group_by(orders.c.status)):
            open_orders[status] = n
        return {"tractors": tractors_n, "open_orders": open_orders,
                "parts": [{"part_id": p, **{k: c.get(k, 0) for k in ("ok", "warning", "alert")}}
                          for p, c in sorted(counts.items())]}

    @app.get("/api/tractors", response_model=schemas.TractorPage, tags=["fleet"], responses=AUTH_RESPONSES)
    def list_tractors(_: Reader, session: SessionDep,
                      status: Annotated[schemas.HealthStatus | None, Query(
                          description="only tractors with a part in this status")] = None,
                      part_id: Annotated[str | None, Query(max_length=64)] = None,
                      q: Annotated[str | None, Query(max_length=32, description="tractor id prefix")] = None,
                      sort: Annotated[Literal["health", "tractor_id"], Query()] = "health",
                      limit: Annotated[int, Query(ge=1, le=500)] = 50,
                      offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0) -> dict[str, Any]:
        """Tractors with their parts' health, worst first (aggregated and paginated in the database)."""
        conds: list[Any] = []
        if part_id:
            conds.append(part_health.c.part_id == part_id)
        if q:
            conds.append(part_health.c.tractor_id.startswith(q, autoescape=True))
        if status:
            conds.append(part_health.c.tractor_id.in_(select(part_health.c.tractor_id)
                                                      .where(part_health.c.status == status)))
        worst = func.min(part_health.c.health).label("worst_health")
        grouped = (select(part_health.c.tractor_id, worst,
                          func.sum(case((part_health.c.status == "alert", 1), else_=0)).label("alerts"),
                          func.sum(case((part_health.c.status == "warning", 1), else_=0)).label("warnings"))
                   .where(and_(True, *conds)).group_by(part_health.c.tractor_id))
        total = session.execute(select(func.count()).select_from(grouped.subquery())).scalar_one()
        order = [worst.asc(), part_health.c.tractor_id] if sort == "health" else [part_health.c.tractor_id]
        page_rows = session.execute(grouped.order_by(*order).limit(limit).offset(offset)).all()
        ids = [r.tractor_id for r in page_rows]
        by_tractor: dict[str, list[dict[str, Any]]] = {t: [] for t in ids}
        if ids:
            for r in session.execute(select(part_health).where(part_health.c.tractor_id.in_(ids))
                                     .order_by(part_health.c.health)):
                by_tractor[r.tractor_id].append(_health_doc(r))
        items = [{"tractor_id": r.tractor_id, "worst_health": r.worst_health, "alerts": int(r.alerts or 0),
                  "warnings": int(r.warnings or 0), "parts": by_tractor[r.tractor_id]} for r in page_rows]
        return {"items": items, "total": total, "limit": limit, "offset": offset}

    @app.get("/api/tractors/{tractor_id}", response_model=schemas.TractorDetail, tags=["fleet"],
             responses={404: {"model": schemas.Problem}, **AUTH_RESPONSES})
    def get_tractor(tractor_id: TractorId, _: Reader, session: SessionDep) -> dict[str, Any]:
        """One tractor: every part's health and its orders, newest first."""
        health_rows = session.execute(select(part_health).where(part_health.c.tractor_id == tractor_id)
                                      .order_by(part_health.c.part_id)).all()
        order_rows = session.execute(select(orders).where(orders.c.tractor_id == tractor_id)
                                     .order_by(orders.c.id.desc())).all()
        if not health_rows and not order_rows:
            raise HTTPException(404, f"tractor {tractor_id} has no trends and no orders")
        return {"tractor_id": tractor_id, "parts": [_health_doc(r) for r in health_rows],
                "orders": [order_document(r) for r in order_rows]}

    @app.get("/api/tractors/{tractor_id}/trends/{signal}", response_model=schemas.TrendSeries, tags=["fleet"],
             responses={404: {"model": schemas.Problem}, **AUTH_RESPONSES})
    def trend_series(tractor_id: TractorId, signal: Annotated[str, PathParam(
                         min_length=1, max_length=64, pattern=r"^[a-z0-9_]+$")], _: Reader, session: SessionDep,
                     since: Annotated[datetime | None, Query(description="windows starting at or after")] = None,
                     limit: Annotated[int, Query(ge=1, le=10000, description="newest windows")] = 1000
                     ) -> dict[str, Any]:
        """Closed trend windows of one signal (oldest first), the thresholds of the parts it watches and the
        latest trend fit (part health) to draw the forecast crossing."""
        q = select(trend_windows).where((trend_windows.c.tractor_id == tractor_id)
                                        & (trend_windows.c.signal == signal))
        if since:
            q = q.where(trend_windows.c.window_start >= _utc(since))
        rows = session.execute(q.order_by(trend_windows.c.window_start.desc()).limit(limit)).all()
        part_rows = session.execute(select(parts).where(parts.c.signal == signal).order_by(parts.c.part_id)).all()
        if not rows and not part_rows:
            raise HTTPException(404, f"no trend windows for tractor {tractor_id} and signal {signal}")
        health_rows = session.execute(select(part_health).where((part_health.c.tractor_id == tractor_id)
                                                                & (part_health.c.signal == signal))).all()
        windows = [{**r._mapping, "window_start": _utc(r.window_start), "window_end": _utc(r.window_end)}
                   for r in reversed(rows)]
        return {"tractor_id": tractor_id, "signal": signal, "windows": windows,
                "parts": [dict(p._mapping) for p in part_rows], "health": [_health_doc(h) for h in health_rows]}

    # ------------------------------------------------------------- catalog
    @app.get("/api/parts", response_model=list[schemas.Part], tags=["catalog"], responses=AUTH_RESPONSES)
    def list_parts(_: Reader, session: SessionDep) -> list[dict[str, Any]]:
        """The parts catalog: wear signal, direction, thresholds, lead time and price per part."""
        return [dict(r._mapping) for r in session.execute(select(parts).order_by(parts.c.part_id))]

    @app.patch("/api/parts/{part_id}", response_model=schemas.Part, tags=["catalog"],
               responses={404: {"model": schemas.Problem}, **AUTH_RESPONSES})
    def patch_part(part_id: Annotated[str, PathParam(min_length=1, max_length=64)], body: schemas.PartPatch,
                   _: Admin, session: SessionDep) -> dict[str, Any]:
        """Change a part's name, lead time or price (admin). New orders use the new values."""
        values = body.model_dump(exclude_none=True)
        if values:
            session.execute(update(parts).where(parts.c.part_id == part_id).values(**values))
        row = session.execute(select(parts).where(parts.c.part_id == part_id)).first()
        if row is None:
            raise HTTPException(404, f"part {part_id} is not in the catalog")
        session.commit()
        return dict(row._mapping)

    # ------------------------------------------------------------- tokens
    def token_doc(row: Any) -> dict[str, Any]:
        return {"id": row.id, "name": row.name, "role": row.role, "created_at": _utc(row.created_at),
                "revoked_at": _utc(row.revoked_at)}

    @app.get("/api/tokens", response_model=list[schemas.TokenInfo], tags=["tokens"], responses=AUTH_RESPONSES)
    def list_tokens(_: Admin, session: SessionDep) -> list[dict[str, Any]]:
        """Every token (never the secrets) (admin)."""
        return [token_doc(r) for r in session.execute(select(api_tokens).order_by(api_tokens.c.id))]

    @app.post("/api/tokens", response_model=schemas.TokenCreated, status_code=201, tags=["tokens"],
              responses=AUTH_RESPONSES)
    def new_token(body: schemas.TokenIn, _: Admin, session: SessionDep) -> dict[str, Any]:
        """Create a token (admin); the secret is in this answer only."""
        token_id, secret = auth.create_token(session, body.role, body.name)
        session.commit()
        row = session.execute(select(api_tokens).where(api_tokens.c.id == token_id)).one()
        return {**token_doc(row), "token": secret}

    @app.delete("/api/tokens/{token_id}", status_code=204, tags=["tokens"],
                responses={404: {"model": schemas.Problem}, **AUTH_RESPONSES})
    def delete_token(token_id: Annotated[int, PathParam(ge=1, le=MAX_INT)], _: Admin,
                     session: SessionDep) -> Response:
        """Revoke a token (admin)."""
        if not auth.revoke_token(session, token_id):
            raise HTTPException(404, f"no active token {token_id}")
        session.commit()
        return Response(status_code=204)

    return app

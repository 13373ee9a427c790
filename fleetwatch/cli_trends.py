"""``fleetwatch trends`` (query, worst, replay) and ``fleetwatch evaluate``: trend tables and detection quality."""

from __future__ import annotations

import json
import sys
import time
import zlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fleetwatch.common import console, err, fail, get_settings

trends_app = typer.Typer(help="Trend tables: query windows, the fleet's worst parts, in-process replays.",
                         no_args_is_help=True)
evaluate_app = typer.Typer()


@trends_app.command("query")
def trends_query(
    tractor: Annotated[str | None, typer.Option(help="tractor id, e.g. T00042")] = None,
    signal: Annotated[str | None, typer.Option(help="signal name, e.g. oil_pressure_kpa")] = None,
    since: Annotated[str | None, typer.Option(help="30d, 12h, 2w or an ISO-8601 time")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="at most this many rows")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table | csv | parquet")] = "table",
    output: Annotated[Path | None, typer.Option(help="write here (required for parquet)")] = None,
) -> None:
    """Closed trend windows of one tractor and/or signal, oldest first."""
    from functions.db import make_engine
    from trends.query import parse_since, trend_frame

    if fmt not in ("table", "csv", "parquet"):
        fail("--format must be table, csv or parquet")
    if fmt == "parquet" and output is None:
        fail("--format parquet needs --output FILE")
    try:
        since_ts = parse_since(since)
    except ValueError as exc:
        fail(str(exc))
    engine = make_engine(get_settings().db_url)
    try:
        frame = trend_frame(engine, tractor=tractor, signal=signal, since=since_ts, limit=limit)
    finally:
        engine.dispose()
    if fmt == "parquet":
        try:
            frame.to_parquet(output)
        except ImportError:
            fail("parquet needs pyarrow: pip install pyarrow")
        err.print(f"{len(frame)} windows written to {output}")
        return
    if fmt == "csv":
        frame.to_csv(output if output else sys.stdout, index=False)
        return
    table = Table("tractor", "signal", "window start", "n", "mean", "min", "max", "std", "normalised", "level",
                  "slope/h [95 % CI]", "flags", title=f"trend windows ({len(frame)})")
    for r in frame.itertuples(index=False):
        slope = ("—" if r.slope_per_h != r.slope_per_h
                 else f"{r.slope_per_h:+.4g} [{r.slope_lo:+.3g}, {r.slope_hi:+.3g}]")
        norm = "—" if r.norm_value != r.norm_value else f"{r.norm_value:.4g}"
        level = "—" if r.level != r.level else f"{r.level:.4g}"
        table.add_row(r.tractor_id, r.signal, r.window_start.strftime("%Y-%m-%d %H:%M"), str(r.count),
                      f"{r.mean:.4g}", f"{r.min:.4g}", f"{r.max:.4g}", f"{r.std:.3g}", norm, level, slope,
                      str(r.quality_flags))
    console.print(table)


@trends_app.command("worst")
def trends_worst(limit: Annotated[int, typer.Option(min=1)] = 20) -> None:
    """The fleet's least healthy parts (view v_worst_parts)."""
    from functions.db import make_engine
    from trends.query import worst_parts

    engine = make_engine(get_settings().db_url)
    try:
        frame = worst_parts(engine, limit)
    finally:
        engine.dispose()
    table = Table("#", "tractor", "part", "status", "health", "level", "failure at", "forecast to failure", "as of",
                  title="worst parts in the fleet")
    for r in frame.itertuples(index=False):
        ttf = "—" if r.ttf_h is None or r.ttf_h != r.ttf_h else f"{r.ttf_h / 24:.1f} d"
        table.add_row(str(r.fleet_rank), r.tractor_id, r.part_id, r.status, f"{r.health:.2f}", f"{r.level:.4g}",
                      f"{r.failure_threshold:g}", ttf, str(r.as_of)[:16])
    console.print(table)


def _lead_times(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {str(r["part_id"]): float(r["lead_time_h"]) for r in rows}


def _orders_for_evaluation(url: str) -> list[Any]:
    from sqlalchemy import select

    from functions.db import make_engine
    from ordering.tables import orders
    from trends.evaluate import Order, parse_ts

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(orders.c.tractor_id, orders.c.part_id, orders.c.evidence, orders.c.placed_at))
            out = []
            for tid, part, evidence, placed in rows:
                ev = evidence if isinstance(evidence, dict) else json.loads(evidence or "{}")
                when = parse_ts(ev.get("first_detected_at")) or parse_ts(ev.get("detected_at")) or parse_ts(placed)
                if when is not None:
                    out.append(Order(str(tid), str(part), when))
            return out
    finally:
        engine.dispose()


def print_report(report: Any, title: str) -> None:
    """The evaluation table, then recall and on-time by wear kind."""
    table = Table("metric", "value", title=title)
    for k, v in report.rows():
        table.add_row(k, v)
    console.print(table)
    kinds = Table("wear kind", "episodes", "ordered", "on time", "on time where the onset allowed it",
                  title="by wear kind")
    for kind, c in report.by_kind.items():
        kinds.add_row(kind, str(int(c["episodes"])), str(int(c["ordered"])), str(int(c["on_time"])),
                      f"{int(c['on_time_feasible'])} of {int(c['feasible'])}")
    console.print(kinds)


@evaluate_app.command()
def evaluate(
    truth: Annotated[Path, typer.Option(help="ground truth JSON written by fleetwatch simulate --truth")],
    as_json: Annotated[bool, typer.Option("--json", help="print the numbers as JSON")] = False,
) -> None:
    """Compare placed orders with the simulator's ground truth: recall, on time, false orders, duplicates."""
    from fleetwatch.db import CATALOG, CatalogError, load_catalog
    from trends.evaluate import evaluate as score

    try:
        doc = json.loads(truth.read_text())
    except (OSError, ValueError) as exc:
        fail(f"cannot read ground truth {truth}: {exc}")
    if not isinstance(doc, dict) or "wear" not in doc or "start" not in doc or "end" not in doc:
        fail(f"{truth} is not a ground-truth file (needs start, end, wear)")
    try:
        lead = _lead_times(load_catalog(CATALOG))
    except CatalogError as exc:
        fail(str(exc))
    try:
        report = score(doc, _orders_for_evaluation(get_settings().db_url), lead)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        console.print_json(json.dumps({
            "episodes": len(report.episodes), "ordered": report.ordered, "recall": report.recall,
            "on_time_rate": report.on_time_rate, "on_time_feasible_rate": report.on_time_feasible_rate,
            "median_lead_days": report.median_lead_days, "false_orders": len(report.false_orders),
            "false_per_1000_tractor_months": report.false_per_1000, "duplicates": report.duplicates,
            "tractor_months": report.tractor_months, "by_kind": report.by_kind}))
        return
    print_report(report, f"detection quality vs ground truth ({doc.get('scenario', truth.name)})")


@trends_app.command("replay")
def trends_replay(
    scenario: Annotated[str, typer.Option(help="shipped scenario name or TOML path")] = "mixed-wear",
    tractors: Annotated[int | None, typer.Option(min=1)] = None,
    days: Annotated[float | None, typer.Option(min=1)] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    batch: Annotated[int, typer.Option(min=1, help="telemetry messages per handler batch")] = 2000,
    partitions: Annotated[int, typer.Option(min=1)] = 4,
    truth: Annotated[Path | None, typer.Option(help="write ground truth JSON here")] = None,
    memory: Annotated[bool, typer.Option(help="no database: detector state in memory, one order per alert episode")]
    = False,
) -> None:
    """Feed a simulated fleet straight into trends-detect and ordering-place in-process (no brokers).

    The database is real (FLEETWATCH_DATABASE_URL): trend tables, part health and orders land exactly as with
    the stack, so ``fleetwatch evaluate`` works afterwards. MQTT, the bridge and Kafka are skipped.
    ``--memory`` skips the database too (the fastest way to score detection on a large fleet): an order is the
    first alert of each (tractor, part) episode, which is what ordering-place does with a fresh order table.
    """
    from fleetwatch.db import CATALOG, load_catalog, upgrade
    from functions.config import load_functions
    from functions.db import make_engine, make_sessions
    from functions.model import Context, Metrics
    from ordering.place import handler as place_handler
    from simulators.scenario import ScenarioError, build, load
    from trends.detect import handler as detect_handler
    from trends.evaluate import evaluate as score

    s = get_settings()
    catalog = load_catalog(CATALOG)
    try:
        fleet, run_days, period = build(load(scenario), tractors=tractors, days=days, seed=seed, catalog=catalog)
    except ScenarioError as exc:
        fail(str(exc))
    if memory:
        _replay_in_memory(fleet, run_days, period, batch, partitions, catalog, s, truth, scenario)
        return
    upgrade(s.db_url)
    params = load_functions(s.functions_path)["trends-detect"].params
    engine = make_engine(s.db_url)
    sessions = make_sessions(engine)
    pending: list[tuple[str, bytes]] = []
    stats = {"messages": 0, "alerts": 0, "compute_s": 0.0}

    def flush() -> None:
        if not pending:
            return
        records = [{"topic": "telemetry", "partition": zlib.crc32(t.encode()) % partitions, "offset": i,
                    "json": json.loads(p)} for i, (t, p) in enumerate(pending)]
        stats["messages"] += len(pending)
        pending.clear()
        started = time.perf_counter()
        with sessions() as session:
            ctx = Context("trends-detect", 600, session, params, Metrics())
            detect_handler({"records": {"telemetry-0": records}}, ctx)
            alerts = [e.value for e in ctx.emitted if isinstance(e.value, dict)]
            if alerts:
                octx = Context("ordering-place", 600, session, {}, Metrics())
                place_handler({"records": {"wear-alerts-0": [{"json": a, "offset": i} for i, a in enumerate(alerts)]}},
                              octx)
            session.commit()
        stats["alerts"] += len(alerts)
        stats["compute_s"] += time.perf_counter() - started

    began = time.perf_counter()
    with console.status("replaying") as status:
        for frac, msgs in fleet.run(run_days, period):
            pending.extend(msgs)
            if len(pending) >= batch:
                flush()
                status.update(f"replaying {scenario}: {100 * frac:.1f} % · {stats['messages']} messages · "
                              f"{stats['alerts']} alerts")
        flush()
    engine.dispose()
    ground = fleet.truth()
    if truth:
        truth.write_text(json.dumps(ground, indent=2))
    err.print(f"replayed {stats['messages']} messages in {time.perf_counter() - began:.0f}s "
              f"(handlers {stats['compute_s']:.0f}s), {stats['alerts']} alerts")
    report = score(ground, _orders_for_evaluation(s.db_url), _lead_times(catalog))
    print_report(report, f"detection quality vs ground truth ({scenario}, in-process replay)")


def _replay_in_memory(fleet: Any, run_days: float, period: float, batch: int, partitions: int,
                     catalog: list[dict[str, Any]], s: Any, truth: Path | None, scenario: str) -> None:
    """The replay with detector state in memory and orders = first alert per (tractor, part) episode."""
    from functions.config import load_functions
    from trends.detect import Detector, Params, Part, flatten
    from trends.evaluate import Order, parse_ts
    from trends.evaluate import evaluate as score

    class Row:
        def __init__(self, d: dict[str, Any]) -> None:
            self.__dict__.update(d)
            self.extra = dict(d)  # Part.from_row reads the detector keys from extra, as from parts.extra

    params = Params.from_context(load_functions(s.functions_path)["trends-detect"].params)
    detector = Detector([Part.from_row(Row(r)) for r in catalog], params)
    states: dict[str, Any] = {}
    parts_state: dict[str, Any] = {}
    first: dict[tuple[str, str], dict[str, Any]] = {}
    pending: list[tuple[str, bytes]] = []
    count = {"messages": 0, "readings": 0.0, "compute_s": 0.0}

    def flush() -> None:
        if not pending:
            return
        records = [{"topic": "telemetry", "partition": zlib.crc32(t.encode()) % partitions, "json": json.loads(p)}
                   for t, p in pending]
        count["messages"] += len(pending)
        pending.clear()
        started = time.perf_counter()
        out = detector.process(flatten(records), states, parts_state, states.get)
        count["compute_s"] += time.perf_counter() - started
        count["readings"] += out.counters.get("readings", 0.0)
        for a in out.alerts:
            first.setdefault((a["tractor_id"], a["part_id"]), a)

    began = time.perf_counter()
    with console.status("replaying in memory") as status:
        for frac, msgs in fleet.run(run_days, period):
            pending.extend(msgs)
            if len(pending) >= batch:
                flush()
                status.update(f"replaying {scenario} in memory: {100 * frac:.1f} % · {count['messages']} messages")
        flush()
    ground = fleet.truth()
    if truth:
        truth.write_text(json.dumps(ground, indent=2))
    err.print(f"replayed {count['messages']} messages ({count['readings']:.0f} readings) in "
              f"{time.perf_counter() - began:.0f}s; detector {count['compute_s']:.0f}s "
              f"({count['readings'] / max(count['compute_s'], 1e-9):,.0f} readings/s)")
    orders = [Order(t, p, ts) for (t, p), a in first.items() if (ts := parse_ts(a["detected_at"])) is not None]
    report = score(ground, orders, _lead_times(catalog))
    print_report(report, f"detection quality vs ground truth ({scenario}, in-process replay, state in memory)")

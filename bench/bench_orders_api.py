"""Operator API at fleet scale: 10,000 tractors (10 parts each) and 5,000 orders on SQLite.

Each endpoint the operator page calls is timed through the ASGI app (median of repeated calls) and
compared, as a ratio, with ``GET /api/me`` (token check + one lookup) measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from sqlalchemy import insert

from bench.common import report
from fleetwatch.db import CATALOG, load_catalog, upgrade
from functions.db import make_engine, make_sessions
from ordering.api import create_app
from ordering.auth import create_token
from ordering.tables import order_events, orders
from trends.tables import part_health, trend_windows

STATUSES = ["placed", "acknowledged", "shipped", "installed", "cancelled"]


def seed(url: str, tractors: int, n_orders: int, seed: int = 3) -> str:
    """Bulk-load part health, orders with one event each and a month of windows for one tractor."""
    rng = np.random.default_rng(seed)
    parts = load_catalog(CATALOG)
    now = datetime(2026, 11, 27, tzinfo=UTC)
    engine = make_engine(url)
    with engine.begin() as conn:
        health = rng.uniform(0.0, 1.0, (tractors, len(parts)))
        rows = [{"tractor_id": f"T{i + 1:05d}", "part_id": p["part_id"], "signal": p["signal"], "level": 1.0,
                 "health": float(health[i, j]), "slope_per_h": 0.0, "ttf_h": None, "ttf_lo_h": None,
                 "status": "alert" if health[i, j] < 0.1 else "warning" if health[i, j] < 0.3 else "ok",
                 "as_of": now} for i in range(tractors) for j, p in enumerate(parts)]
        for k in range(0, len(rows), 20_000):
            conn.execute(insert(part_health), rows[k:k + 20_000])
        order_rows = []
        for k in range(n_orders):
            p = parts[k % len(parts)]
            placed = now - timedelta(minutes=int(rng.integers(0, 60 * 24 * 90)))
            order_rows.append({"tractor_id": f"T{k + 1:05d}", "part_id": p["part_id"], "episode_id": f"e{k}",
                               "status": STATUSES[k % 5], "priority": f"P{1 + k % 3}", "placed_at": placed,
                               "updated_at": placed, "alert_count": 1, "last_alert_at": placed,
                               "ttf_h": float(rng.uniform(10, 900)), "expected_delivery": placed + timedelta(days=5),
                               "cost_eur": p["price_eur"], "evidence": {"signal": p["signal"], "level": 1.0},
                               "signal": p["signal"], "lead_time_h": p["lead_time_h"]})
        conn.execute(insert(orders), order_rows)
        conn.execute(insert(order_events), [{"order_id": k + 1, "at": now, "kind": "placed", "actor": "bench",
                                             "from_status": None, "to_status": "placed", "detail": None}
                                            for k in range(n_orders)])
        conn.execute(insert(trend_windows), [
            {"tractor_id": "T00001", "signal": "oil_pressure_kpa", "window_start": now - timedelta(hours=h + 1),
             "window_end": now - timedelta(hours=h), "count": 60, "mean": 300.0, "min": 290.0, "max": 310.0,
             "std": 3.0, "norm_value": 300.0, "slope_per_h": -0.1, "slope_lo": -0.2, "slope_hi": 0.0,
             "quality_flags": ""} for h in range(720)])
    sessions = make_sessions(engine)
    with sessions() as session:
        _, secret = create_token(session, "operator", "bench")
        session.commit()
    return secret


def main() -> None:
    """Seed, time every page endpoint, print the table and write bench/results/orders_api.json."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tractors", type=int, default=10_000)
    ap.add_argument("--orders", type=int, default=5_000)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        upgrade(url)
        t0 = time.perf_counter()
        secret = seed(url, args.tractors, args.orders)
        seeded_s = time.perf_counter() - t0
        client = TestClient(create_app(make_sessions(make_engine(url))))
        h = {"Authorization": f"Bearer {secret}"}
        cases = [
            ("baseline: GET /api/me", "/api/me"),
            ("orders page (open, newest)", "/api/orders?status=placed&status=acknowledged&status=shipped"),
            ("orders page 50, sorted by ttf", "/api/orders?sort=ttf_h&offset=2000"),
            ("orders filtered P1 + part", "/api/orders?priority=P1&part_id=OIL-PUMP"),
            ("orders CSV (all 5,000)", "/api/orders.csv"),
            ("order detail", "/api/orders/2500"),
            ("fleet summary", "/api/fleet"),
            ("tractors worst first, page 1", "/api/tractors"),
            ("tractors with an alert, page 3", "/api/tractors?status=alert&offset=100"),
            ("tractor detail", "/api/tractors/T00001"),
            ("trend series (720 windows)", "/api/tractors/T00001/trends/oil_pressure_kpa"),
        ]
        timings: dict[str, float] = {}
        for label, path in cases:
            assert client.get(path, headers=h).status_code == 200, path  # warm up and check
            samples = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                client.get(path, headers=h)
                samples.append(time.perf_counter() - t)
            timings[label] = statistics.median(samples) * 1000
    base = timings["baseline: GET /api/me"]
    rows = [[label, ms, ms / base] for label, ms in timings.items()]
    report("orders_api", f"Operator API on SQLite: {args.tractors:,} tractors × 10 parts, {args.orders:,} orders "
           f"(median of {args.repeat})", ["endpoint", "median ms", "× baseline"], rows,
           {"tractors": args.tractors, "orders": args.orders, "seed_s": seeded_s, "baseline_ms": base})


if __name__ == "__main__":
    main()

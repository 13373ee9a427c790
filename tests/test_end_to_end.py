"""End to end on the real stack: simulated fleet → MQTT → bridge → Kafka → trends → orders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from fleetwatch.db import upgrade
from fleetwatch.pipeline import end_offsets, ensure_topics, wait_drained
from fleetwatch.settings import Settings
from fleetwatch.stack import Stack
from functions.db import make_engine
from ordering.tables import orders
from trends.tables import trend_windows

pytestmark = pytest.mark.services
WORKERS = ["bridge", "fn-trends", "fn-ordering"]
FLEETWATCH = str(Path(sys.executable).with_name("fleetwatch"))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_degrading_tractor_gets_exactly_one_order(isolated: Settings, backend: str, tmp_path: Path,
                                                  pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}" if backend == "sqlite" else pg_url
    monkeypatch.setenv("FLEETWATCH_DATABASE_URL", url)
    s = Settings()
    upgrade(url)
    ensure_topics(s)
    stack = Stack(s)
    stack.start(WORKERS)
    try:
        truth_file = tmp_path / "truth.json"
        sim = subprocess.run([FLEETWATCH, "simulate", "--tractors", "20", "--days", "20", "--degrading", "1",
                              "--seed", "11", "--truth", str(truth_file)],
                             capture_output=True, text=True, env=os.environ.copy(), timeout=300)
        assert sim.returncode == 0, sim.stderr
        published = int(sim.stderr.split("published ")[1].split()[0])
        wait_drained(s, published, timeout=400)
    finally:
        stack.stop(WORKERS)

    truth = json.loads(truth_file.read_text())
    assert sum(end_offsets(s, s.topic("telemetry.dlq")).values()) == 0
    engine = make_engine(url)
    with engine.connect() as conn:
        placed = [(r.tractor_id, r.part_id) for r in conn.execute(select(orders))]
        tractors_with_trends = {r[0] for r in conn.execute(select(trend_windows.c.tractor_id).distinct())}
        windows = conn.execute(select(func.count()).select_from(trend_windows)).scalar_one()
    engine.dispose()
    expected = [(w["tractor_id"], w["part_id"]) for w in truth["wear"]]
    assert expected == [("T00001", "OIL-PUMP")]
    assert placed == expected, f"orders {placed} but ground truth wear {expected}"
    assert tractors_with_trends == set(truth["tractors"])
    assert windows > 20 * 19 * 24 * 4  # ~19 closed days of hourly windows for 4+ signals per tractor

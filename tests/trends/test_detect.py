"""The detector's compute path in-process: windows by event time, duplicates, quiet tractors, normalisation, alerts."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest

from trends.detect import Detector, Params, Part, flatten

START = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday
OIL_PUMP = Part("OIL-PUMP", "oil_pressure_kpa", "falling", 320.0, 220.0, 150.0, 120.0,
                (("engine_rpm", 1800.0), ("oil_temp_c", 95.0)), "log",
                (("engine_rpm", 1500.0, 2400.0), ("engine_load_pct", 40.0, 100.0)))


def _ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def oil_pressure(level: float, rpm: np.ndarray, oil_t: np.ndarray) -> np.ndarray:
    """The operating effect the simulator applies (value equals ``level`` at 1800 rpm and 95 °C)."""
    return level * (rpm / 1800.0) ** 0.7 * (1 - 0.004 * (oil_t - 95.0))


def fleet_records(days: int, tractors: int = 3, level: Any = None, seed: int = 0,
                  offset: tuple[int, float, float] | None = None) -> list[dict[str, Any]]:
    """Working days 7:00–17:00, a sample every 15 min; per-day rpm set-points swing the raw pressure ±10 %.

    ``level(i, t_days)`` gives tractor i's reference level; ``offset`` = (tractor, from day, kPa) adds a
    calibration step to that tractor's sensor.
    """
    rng = np.random.default_rng(seed)
    records: list[dict[str, Any]] = []
    seq = [0] * tractors
    for day in range(days):
        set_rpm = rng.uniform(1650, 2150, tractors)
        for q in range(40):
            t = START + timedelta(days=day, hours=7, minutes=15 * q)
            rpm = set_rpm + rng.normal(0, 60, tractors)
            oil_t = 95 + rng.normal(0, 4, tractors)
            for i in range(tractors):
                lvl = level(i, day + (7 + q / 4) / 24) if level else 320.0
                p = float(oil_pressure(lvl, rpm[i], oil_t[i])) + rng.normal(0, 4.0)
                if offset and offset[0] == i and day >= offset[1]:
                    p += offset[2]
                seq[i] += 1
                records.append({"topic": "telemetry", "partition": 0, "json": {
                    "v": 1, "tractor_id": f"T{i + 1:05d}", "seq": seq[i], "samples": [{
                        "ts": _ts(t), "readings": {"engine_rpm": round(float(rpm[i]), 1), "engine_load_pct": 60.0,
                                                   "oil_temp_c": round(float(oil_t[i]), 2),
                                                   "oil_pressure_kpa": round(p, 1)}}]}})
    return records


def run(records: list[dict[str, Any]], batch: int = 300, params: Params | None = None
        ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]], dict[str, float]]:
    det = Detector([OIL_PUMP], params or Params())
    states: dict[str, Any] = {}
    partitions: dict[str, Any] = {}
    windows, alerts = [], []
    counters: dict[str, float] = {}
    for a in range(0, len(records), batch):
        out = det.process(flatten(records[a:a + batch]), states, partitions, lambda t: states.get(t))
        windows += out.windows
        alerts += out.alerts
        for k, v in out.counters.items():
            counters[k] = counters.get(k, 0) + v
    return states, windows, alerts, counters


def test_flatten_keeps_one_row_per_sample_and_skips_garbage() -> None:
    recs = fleet_records(1, tractors=1)[:3]
    recs.append({"topic": "telemetry", "partition": 0, "json": None})
    recs.append({"topic": "telemetry", "partition": 0, "json": {"tractor_id": 5, "seq": "x"}})
    recs.append({"topic": "telemetry", "partition": 0, "json": {"tractor_id": "T00001", "seq": 9, "samples": [
        7, {"ts": "2026-03-02T07:00:00Z", "readings": [1, 2]},
        {"ts": "2026-03-02T07:00:01Z", "readings": {"engine_rpm": 1800.0}}]}})
    frame = flatten(recs)
    assert len(frame) == 4  # the three good messages and the one good sample beside a number and a list
    assert frame["engine_rpm"].iloc[-1] == 1800.0
    assert set(frame.columns) >= {"tractor_id", "seq", "ts", "oil_pressure_kpa", "engine_rpm"}


def test_duplicates_are_dropped_and_shuffled_samples_land_in_the_same_windows() -> None:
    recs = fleet_records(3, tractors=2)
    _, base_windows, _, _ = run(recs)
    rng = np.random.default_rng(9)
    noisy = list(recs)
    noisy += [recs[i] for i in rng.choice(len(recs), 50, replace=False)]  # QoS 1 redeliveries
    # Reorder inside 30-minute blocks: later than the window but within the allowed lateness.
    blocks = [noisy[i:i + 4] for i in range(0, len(noisy), 4)]
    shuffled = [r for b in blocks for r in rng.permutation(np.array(b, dtype=object)).tolist()]
    _, windows, _, counters = run(shuffled)
    assert counters["duplicates_dropped"] == 50
    key = ["tractor_id", "signal", "window_start"]
    a = pd.DataFrame(base_windows).sort_values(key).reset_index(drop=True)
    b = pd.DataFrame(windows).sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[key + ["count", "mean", "min", "max"]], b[key + ["count", "mean", "min", "max"]])


def test_a_quiet_tractors_open_window_is_closed_by_its_partitions_progress() -> None:
    recs = [r for r in fleet_records(2, tractors=2) if not (r["json"]["tractor_id"] == "T00002"
                                                            and r["json"]["samples"][0]["ts"] >= "2026-03-02T12")]
    # T00002 goes quiet at noon on day 1; T00001 keeps working the next day.
    _, windows, _, counters = run(recs, batch=20)
    last = max(w["window_start"] for w in windows if w["tractor_id"] == "T00002")
    assert last == datetime(2026, 3, 2, 11, tzinfo=UTC)
    assert counters["windows_closed_idle"] >= 1


def test_normalisation_removes_the_engine_speed_effect() -> None:
    _, windows, _, _ = run(fleet_records(10, tractors=2))
    frame = pd.DataFrame([w for w in windows if w["signal"] == "oil_pressure_kpa" and w["norm_value"] is not None])
    late = frame[frame["window_start"] >= START + timedelta(days=3)]
    assert late["mean"].std() > 10.0  # raw pressure swings with the daily rpm set-point
    assert late["norm_value"].std() < 4.0  # normalised to 1800 rpm / 95 °C it is flat…
    assert abs(late["norm_value"].mean() - 320.0) < 5.0  # …at the reference level


def test_a_wearing_pump_gets_one_alert_episode_and_healthy_ones_none() -> None:
    def level(i: int, t: float) -> float:  # tractor 1 wears linearly from day 5 to failure on day 35
        return 320.0 - 170.0 * max(0.0, (t - 5) / 30) if i == 0 else 320.0

    _, _, alerts, _ = run(fleet_records(30, tractors=3, level=level))
    assert {a["tractor_id"] for a in alerts} == {"T00001"}
    assert len({a["episode_id"] for a in alerts}) == 1
    first = datetime.fromisoformat(alerts[0]["detected_at"])
    failure = START + timedelta(days=35)
    assert failure - first >= timedelta(hours=OIL_PUMP.lead_time_h)  # ordered in time
    assert alerts[0]["ttf_h"] is not None and alerts[0]["slope_per_h"] < 0


def test_trend_rows_and_orders_do_not_depend_on_how_the_stream_is_cut_into_batches() -> None:
    # Live, a batch holds a second of the fleet; from a backlog or a replay, hours of it. Either way each sample
    # must be gated against the levels of the windows that closed before it arrived, so the same windows are
    # flagged, the same samples used and the same parts ordered at the same time.
    def level(i: int, t: float) -> float:  # one pump wears, one jumps to a held step, one sensor is recalibrated
        return 320.0 - 170.0 * max(0.0, (t - 5) / 25) if i == 0 else (215.0 if i == 1 and t > 12 else 320.0)

    records = fleet_records(24, tractors=3, level=level, offset=(2, 8, 25.0))

    def outcome(batch: int) -> tuple[list[Any], list[Any], list[float]]:
        _, windows, alerts, _ = run(records, batch=batch)
        rows = sorted((w["tractor_id"], w["signal"], w["window_start"], w["count"], w["n_used"], w["quality_flags"],
                       w["norm_value"] or 0.0) for w in windows)
        return ([r[:-1] for r in rows], sorted((a["tractor_id"], a["part_id"], a["detected_at"]) for a in alerts),
                [r[-1] for r in rows])

    live = outcome(3)  # one sample of each tractor per batch
    assert {a[0] for a in live[1]} == {"T00001", "T00002"}  # the wear and the step are ordered
    assert any("change" in r[5] for r in live[0])
    for batch in (40, 400, len(records)):
        got = outcome(batch)
        assert got[:2] == live[:2], f"batches of {batch}"
        np.testing.assert_allclose(got[2], live[2], rtol=1e-9)  # sums taken in another order


def test_a_calibration_step_and_a_stuck_sensor_do_not_alert() -> None:
    recs = fleet_records(30, tractors=2, offset=(0, 12, -45.0))
    for r in recs:  # tractor 2's sensor freezes for two days
        msg = r["json"]
        if msg["tractor_id"] == "T00002" and "2026-03-20" <= msg["samples"][0]["ts"] < "2026-03-22":
            msg["samples"][0]["readings"]["oil_pressure_kpa"] = 301.5
    _, windows, alerts, _ = run(recs)
    assert alerts == []
    flags = [w["quality_flags"] for w in windows if w["signal"] == "oil_pressure_kpa"]
    assert any("stuck" in f for f in flags)
    assert any("change" in f for f in flags)


def test_state_survives_a_json_round_trip() -> None:
    recs = fleet_records(8, tractors=2)
    det = Detector([OIL_PUMP], Params())
    states: dict[str, Any] = {}
    det.process(flatten(recs[:400]), states)
    states = json.loads(json.dumps(states))  # what the trend_state table stores
    out = det.process(flatten(recs[400:]), states)
    assert out.windows and all(isinstance(json.dumps(s), str) for s in states.values())


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def test_an_installed_replacement_resets_the_parts_episode_and_baseline(database: str, tmp_path: Any,
                                                                        request: pytest.FixtureRequest) -> None:
    from sqlalchemy import text

    from fleetwatch.db import upgrade
    from functions.db import make_engine, make_sessions
    from trends.detect import apply_replacements

    def level(i: int, t: float) -> float:
        return 320.0 - 170.0 * max(0.0, (t - 5) / 30)

    states, _, alerts, _ = run(fleet_records(30, tractors=1, level=level))
    assert alerts and states["T00001"]["episodes"]["OIL-PUMP"]
    states["T00002"] = {**states["T00001"], "episodes": {}, "replaced": {}}  # another tractor: not replaced
    url = f"sqlite:///{tmp_path / 'r.db'}" if database == "sqlite" else request.getfixturevalue("pg_url")
    upgrade(url)
    engine = make_engine(url)
    with make_sessions(engine)() as session:
        session.execute(text("INSERT INTO part_replacements (tractor_id, part_id, installed_at) "
                             "VALUES ('T00001', 'OIL-PUMP', '2026-04-01 10:00:00')"))
        det = Detector([OIL_PUMP], Params())
        assert apply_replacements(session, det, states) == 1
        assert apply_replacements(session, det, states) == 0  # applied once only
    engine.dispose()
    st = states["T00001"]
    assert "OIL-PUMP" not in st["episodes"]
    assert st["sig"]["oil_pressure_kpa"]["base"] is None and st["sig"]["oil_pressure_kpa"]["days"] == []


def test_a_sudden_onset_is_ordered_within_two_working_days_of_its_jump() -> None:
    # Sudden-onset wear: 70 % of the way to failure within the hour at day 14 (far outside the sample gate),
    # then on to failure over the next 6 days: a held step that must alert at once, lead time 5 days.
    onset, failure = 14.0, 20.0

    def level(i: int, t: float) -> float:
        if i != 0 or t < onset:
            return 320.0
        return 320.0 - 170.0 * (0.7 + 0.3 * (t - onset) / (failure - onset))

    _, windows, alerts, _ = run(fleet_records(21, tractors=2, level=level))
    assert {a["tractor_id"] for a in alerts} == {"T00001"}
    first = datetime.fromisoformat(alerts[0]["detected_at"])
    assert first - (START + timedelta(days=onset)) <= timedelta(days=2)
    assert START + timedelta(days=failure) - first >= timedelta(hours=OIL_PUMP.lead_time_h)
    assert any("change" in w["quality_flags"] for w in windows if w["tractor_id"] == "T00001")


def test_accelerating_wear_is_ordered_before_its_lead_time() -> None:
    # Exponential wear over 24 days (the simulator's curve): half the way to failure only 4 days before it.
    onset, failure = 6.0, 30.0

    def level(i: int, t: float) -> float:
        x = min(max((t - onset) / (failure - onset), 0.0), 1.0) if i == 0 else 0.0
        return 320.0 - 170.0 * float(np.expm1(4 * x) / np.expm1(4))

    _, _, alerts, _ = run(fleet_records(30, tractors=2, level=level))
    assert {a["tractor_id"] for a in alerts} == {"T00001"}
    first = datetime.fromisoformat(alerts[0]["detected_at"])
    assert START + timedelta(days=failure) - first >= timedelta(hours=OIL_PUMP.lead_time_h)


def test_a_sensor_stuck_far_from_its_level_is_flagged_and_never_taken_for_a_step() -> None:
    # Tractor 2's sensor freezes at 160 kPa (near the failure threshold) for two working days: its windows are
    # far outside the sample gate, yet a frozen reading is no evidence that the level moved.
    recs = fleet_records(30, tractors=2)
    for r in recs:
        msg = r["json"]
        if msg["tractor_id"] == "T00002" and "2026-03-20" <= msg["samples"][0]["ts"] < "2026-03-22":
            msg["samples"][0]["readings"]["oil_pressure_kpa"] = 160.0
    _, windows, alerts, _ = run(recs)
    assert alerts == []
    mine = [w["quality_flags"] for w in windows if w["tractor_id"] == "T00002" and w["signal"] == "oil_pressure_kpa"]
    assert sum("stuck" in f for f in mine) >= 18
    assert not any("change" in f for f in mine)


def test_a_failing_coolant_pump_is_ordered_and_the_oil_cooler_it_heats_is_not(tmp_path: Any) -> None:
    # The simulator's physics: a failing coolant pump heats the oil too (30 % of its excess heat). The shipped
    # catalog watches the oil cooler on the oil-to-coolant difference, so only the coolant pump is ordered,
    # even while the worn pump stays in (past its failure time it keeps degrading).
    from types import SimpleNamespace

    from fleetwatch.db import CATALOG, load_catalog
    from simulators.scenario import build, load

    path = tmp_path / "coolant.toml"
    path.write_text('description = "coolant pump wears out"\ntractors = 3\ndays = 45\nperiod_s = 900\nseed = 3\n'
                    '[[wear]]\ntractor = 1\npart = "COOLANT-PUMP"\nkind = "linear"\nonset_day = 5.0\n'
                    'failure_day = 30.0\n')
    catalog = load_catalog(CATALOG)
    parts = [Part.from_row(SimpleNamespace(**r, extra=dict(r))) for r in catalog]
    fleet, days, period = build(load(str(path)), catalog=catalog)
    det = Detector(parts, Params())
    states: dict[str, Any] = {}
    alerts: list[dict[str, Any]] = []
    for _frac, msgs in fleet.run(days, period):
        recs = [{"topic": "telemetry", "partition": 0, "json": json.loads(p)} for _t, p in msgs]
        alerts += det.process(flatten(recs), states).alerts
    assert {(a["tractor_id"], a["part_id"]) for a in alerts} == {("T00001", "COOLANT-PUMP")}

"""The coupled tractor model and wear: reference levels, physics, failure times match the catalog."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from fleetwatch.db import CATALOG, load_catalog
from ingest.validate import parse_ts
from simulators import model
from simulators.fleet import DAY, Fleet
from simulators.model import REFERENCE, SIGNAL_INDEX, parts_from_catalog
from simulators.wear import WEAR_KINDS, Wear, wear_fraction

START = datetime(2026, 5, 4, tzinfo=UTC)
PARTS = parts_from_catalog(load_catalog(CATALOG))


def _at_reference(signal: str, level: float) -> float:
    L = np.array([level])
    rpm, load = np.array([REFERENCE["engine_rpm"]]), np.array([REFERENCE["engine_load_pct"]])
    amb, oil = np.array([REFERENCE["ambient_temp_c"]]), np.array([REFERENCE["oil_temp_c"]])
    value = {
        "oil_pressure_kpa": lambda: model.oil_pressure(L, rpm, oil),
        "coolant_temp_c": lambda: model.coolant_steady(L, load, amb),
        "oil_temp_c": lambda: model.oil_temp_steady(L, load, amb, np.zeros(1)),
        "hydraulic_pressure_bar": lambda: model.hydraulic_pressure(L, rpm, oil, np.ones(1)),
        "vibration_mm_s": lambda: model.vibration(L, rpm, load),
        "battery_v": lambda: model.battery_voltage(L, rpm, amb),
        "air_filter_dp_kpa": lambda: model.air_filter_dp(L, rpm, load),
        "fuel_rate_lph": lambda: model.fuel_rate(L, rpm, load),
        "fuel_filter_dp_kpa": lambda: model.fuel_filter_dp(L, rpm, load),
        "dpf_soot_pct": lambda: model.dpf_soot(L, np.zeros(1)),
    }[signal]()
    return float(value[0])


@pytest.mark.parametrize("part_id", sorted(PARTS))
def test_every_signal_reads_its_reference_level_at_the_reference_point(part_id: str) -> None:
    part = PARTS[part_id]
    for level in (part.nominal, part.failure):
        assert _at_reference(part.signal, level) == pytest.approx(level, rel=1e-12)


def test_every_catalog_part_has_a_modelled_signal() -> None:
    assert {p.signal for p in PARTS.values()} <= set(model.WEAR_SIGNALS)
    assert len(model.SIGNAL_ORDER) == 13


def test_worn_oil_pump_scales_pressure_with_engine_speed_not_an_offset() -> None:
    rpm = np.array([850.0, 1800.0, 2100.0])
    oil = np.full(3, 95.0)
    healthy = model.oil_pressure(np.full(3, 320.0), rpm, oil)
    worn = model.oil_pressure(np.full(3, 200.0), rpm, oil)
    drop = healthy - worn
    assert drop[0] < drop[1] < drop[2]  # a constant offset would drop the same at every speed
    assert np.allclose(worn / healthy, 200.0 / 320.0)
    assert healthy[0] < healthy[1] < healthy[2]


@pytest.mark.parametrize("kind", WEAR_KINDS)
def test_wear_fraction_is_zero_before_onset_and_one_at_failure(kind: str) -> None:
    onset, failure = 5 * DAY, 25 * DAY
    w = wear_fraction(kind, np.array([0.0, onset, failure - 3600, failure, failure + 3600]), onset, failure)
    assert w[0] == 0.0 and w[1] == 0.0
    assert 0.0 < w[2] < 1.0
    assert w[3] == pytest.approx(1.0, abs=1e-12)
    assert w[4] > 1.0
    grid = wear_fraction(kind, np.linspace(onset, failure, 500), onset, failure)
    assert np.all(np.diff(grid) >= 0)


def test_accelerating_and_sudden_wear_have_their_shape() -> None:
    onset, failure = 0.0, 40 * DAY
    mid = np.array([20 * DAY])
    assert wear_fraction("exponential", mid, onset, failure)[0] < 0.2
    assert wear_fraction("linear", mid, onset, failure)[0] == pytest.approx(0.5)
    assert wear_fraction("sudden", np.array([2 * 3600.0]), onset, failure)[0] >= 0.7


@pytest.mark.parametrize("kind", WEAR_KINDS)
@pytest.mark.parametrize("part_id", ["OIL-PUMP", "COOLANT-PUMP", "AIR-FILTER", "ALTERNATOR", "DPF"])
def test_each_wear_kind_crosses_the_catalog_failure_threshold_at_the_recorded_failure_time(
        kind: str, part_id: str) -> None:
    part = PARTS[part_id]
    fleet = Fleet(2, 3, START, wear=[Wear(0, part_id, part.signal, kind, 2 * DAY, 9 * DAY)], parts=PARTS)
    crossed_at = None
    sign = 1.0 if part.direction == "rising" else -1.0
    for _frac, _msgs in fleet.run(12, 3600.0):
        t = fleet.model_time
        level = fleet.levels(t)[part.signal][0]
        if crossed_at is None and sign * (level - part.failure) >= -1e-9:
            crossed_at = t
    truth = fleet.truth()
    truth_failure = parse_ts(truth["wear"][0]["failure_time"])
    assert truth["wear"][0]["failure_threshold"] == part.failure
    assert crossed_at is not None
    assert START + timedelta(seconds=crossed_at) == truth_failure
    healthy_level = fleet.levels(fleet.model_time)[part.signal][1]
    assert abs(healthy_level - part.nominal) < 0.2 * abs(part.warning - part.nominal)  # type: ignore[operator]


def test_worn_oil_pump_shows_in_the_emitted_readings() -> None:
    fleet = Fleet(2, 5, START, wear=[Wear(0, "OIL-PUMP", "oil_pressure_kpa", "linear", 0.5 * DAY, 10 * DAY)],
                  parts=PARTS)
    ratios = []
    for _frac, _msgs in fleet.run(10, 600.0):
        m = fleet.model
        if (m.mode == model.FIELD).all():
            r = fleet.last_readings
            ratios.append(r[0, SIGNAL_INDEX["oil_pressure_kpa"]] / r[1, SIGNAL_INDEX["oil_pressure_kpa"]])
    assert len(ratios) > 50
    # early on the two pumps deliver alike, at the end the worn one gives about 150/320 of the healthy one
    assert np.mean(ratios[:10]) > 0.85
    assert 0.35 < np.mean(ratios[-10:]) < 0.6


@pytest.mark.parametrize(("change", "expected"), [
    ({"failure_threshold": "lots"}, "usable"),
    ({"signal": "engine_rpm"}, "models no wear signal"),
    ({"failure_threshold": 400.0}, "must lie below nominal"),
])
def test_a_catalog_the_simulator_cannot_model_is_a_scenario_error(change: dict, expected: str) -> None:
    from simulators.scenario import ScenarioError, build, load

    rows = [dict(r) for r in load_catalog(CATALOG)]
    rows[0].update(change)  # OIL-PUMP
    with pytest.raises(ScenarioError, match=expected):
        build(load("oil-pump-demo"), tractors=2, days=1, catalog=rows)


def test_dpf_soot_builds_at_low_load_and_regenerates() -> None:
    low_load = model.Schedule(field_load=(15.0, 20.0), work_day_probability=1.0, sunday_work_probability=1.0)
    fleet = Fleet(3, 2, START, parts=PARTS, schedule=low_load)
    soot = []
    for _frac, _msgs in fleet.run(4, 300.0):
        if (fleet.model.mode != model.OFF).all():
            soot.append(fleet.last_readings[:, SIGNAL_INDEX["dpf_soot_pct"]] - PARTS["DPF"].nominal)
    series = np.asarray(soot)
    assert series.max() > 25.0  # it does build up ...
    assert series.max() < 32.0  # ... but active regeneration caps it
    assert (np.diff(series, axis=0) < -3.0).any()  # and burns it off quickly

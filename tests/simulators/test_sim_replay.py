"""CSV replay: column mapping, time as timestamp or cycle index, unit conversion, bad input."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ingest.contract import telemetry_topic
from ingest.validate import validate
from simulators.replay import Replay, ReplayError, load_mapping

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)

CSV_TS = """unit,when,oil_psi,coolant_F,rpm,hours
7,2026-11-01T08:00:00Z,46.41,190.4,1800,1200.5
7,2026-11-01T08:10:00Z,45.00,191.0,1810,1200.67
12,2026-11-01 08:00:00,40.00,200.0,1700,88
12,2026-11-01T08:10:00Z,not-a-number,201.0,1720,88.2
,2026-11-01T08:20:00Z,40.0,200.0,1700,88.3
12,2026-11-01T08:20:00Z,5000,202.0,1730,88.4
"""

MAP_TS = """
samples_per_message = 1
[entity]
column = "unit"
format = "T{:05d}"
[time]
column = "when"
[engine_hours]
column = "hours"
[signals.oil_pressure_kpa]
column = "oil_psi"
unit = "psi"
[signals.coolant_temp_c]
column = "coolant_F"
unit = "degF"
[signals.engine_rpm]
column = "rpm"
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_replay_maps_entity_time_and_converts_units(tmp_path: Path) -> None:
    rep = Replay(_write(tmp_path, "data.csv", CSV_TS), load_mapping(_write(tmp_path, "map.toml", MAP_TS)), now=NOW)
    msgs = list(rep.messages())
    docs = [json.loads(p) for _, p in msgs]
    assert [d["tractor_id"] for d in docs] == ["T00007", "T00007", "T00012", "T00012", "T00012"]
    assert [d["seq"] for d in docs] == [1, 2, 1, 2, 3]
    first = docs[0]["samples"][0]
    assert first["ts"] == "2026-11-01T08:00:00.000Z"
    assert first["engine_hours"] == 1200.5
    assert first["readings"]["oil_pressure_kpa"] == pytest.approx(46.41 * 6.894757, abs=1e-3)  # ≈ 320 kPa
    assert first["readings"]["coolant_temp_c"] == pytest.approx(88.0, abs=1e-3)  # 190.4 °F
    assert first["readings"]["engine_rpm"] == 1800.0
    assert docs[2]["samples"][0]["ts"] == "2026-11-01T08:00:00.000Z"  # space-separated, zone-less → UTC
    # a reading that is not a number or not plausible is left out; the row's other readings still go
    assert "oil_pressure_kpa" not in docs[3]["samples"][0]["readings"]
    assert docs[3]["samples"][0]["readings"]["coolant_temp_c"] == pytest.approx((201.0 - 32) * 5 / 9, abs=1e-3)
    assert "oil_pressure_kpa" not in docs[4]["samples"][0]["readings"]  # 5000 psi is outside the contract range
    assert rep.stats.skipped_rows == 1 and rep.stats.skipped_readings == 2
    assert rep.stats.entities == {"T00007", "T00012"}
    for tid, payload in msgs:
        assert validate(telemetry_topic(tid), payload, now=NOW).rejections == []


CSV_CYCLES = """1 1 518.67 641.82
1 2 518.67 642.15
1 3 518.67 642.35
2 1 518.67 643.00
2 2 518.67 643.10
"""

MAP_CYCLES = """
samples_per_message = 2
[csv]
delimiter = "whitespace"
header = false
columns = ["unit", "cycle", "T2", "T24"]
[entity]
column = "unit"
format = "ENGINE-{}"
[time]
column = "cycle"
kind = "cycle"
period_s = 3600
[engine_hours]
start = 100
[signals.ambient_temp_c]
column = "T2"
unit = "degR"
[signals.oil_temp_c]
column = "T24"
unit = "degR"
scale = 0.5
"""


def test_replay_of_a_run_to_failure_style_file_with_cycle_index(tmp_path: Path) -> None:
    rep = Replay(_write(tmp_path, "train.txt", CSV_CYCLES), load_mapping(_write(tmp_path, "m.toml", MAP_CYCLES)),
                 now=NOW)
    docs = [json.loads(p) for _, p in rep.messages()]
    assert [(d["tractor_id"], len(d["samples"])) for d in docs] == [("ENGINE-1", 2), ("ENGINE-2", 2), ("ENGINE-1", 1)]
    e1 = docs[0]["samples"] + docs[2]["samples"]
    assert [s["ts"] for s in e1] == ["2026-11-27T10:00:00.000Z", "2026-11-27T11:00:00.000Z",
                                     "2026-11-27T12:00:00.000Z"]  # the last cycle lands at "now"
    assert [s["engine_hours"] for s in e1] == [100.0, 101.0, 102.0]
    assert e1[0]["readings"]["ambient_temp_c"] == pytest.approx(15.0, abs=1e-3)  # 518.67 °R
    assert e1[0]["readings"]["oil_temp_c"] == pytest.approx((641.82 * 5 / 9 - 273.15) * 0.5, abs=1e-3)


@pytest.mark.parametrize(("text", "expected"), [
    ("[entity]\ncolumn = 'u'\n", "time"),
    (MAP_TS.replace('unit = "psi"', 'unit = "furlongs"'), "no conversion from 'furlongs' to kPa"),
    (MAP_TS.replace("signals.engine_rpm", "signals.engine_speed"), "not a contract signal"),
    (MAP_TS + "\nbogus = 1\n", "bogus"),
    ("[entity\n", "not valid TOML"),
    (MAP_TS.replace('column = "when"', 'column = "when"\nkind = "cycle"'), "period_s"),
])
def test_bad_mapping_files_say_what_is_wrong(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ReplayError, match="invalid mapping|not valid TOML") as info:
        load_mapping(_write(tmp_path, "bad.toml", text))
    assert expected in str(info.value)


def test_mapping_that_names_missing_columns_is_refused(tmp_path: Path) -> None:
    mapping = load_mapping(_write(tmp_path, "map.toml", MAP_TS.replace('column = "rpm"', 'column = "speed"')))
    with pytest.raises(ReplayError, match="mapped columns not in the file: speed"):
        Replay(_write(tmp_path, "data.csv", CSV_TS), mapping, now=NOW)

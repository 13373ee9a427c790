"""``fleetwatch simulate`` and ``fleetwatch replay`` without a broker (``--out``): output, truth, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fleetwatch.cli import app
from ingest.validate import parse_ts, validate

runner = CliRunner()


def test_simulate_writes_the_stream_and_the_ground_truth(tmp_path: Path) -> None:
    out, truth = tmp_path / "stream.jsonl", tmp_path / "truth.json"
    result = runner.invoke(app, ["simulate", "--scenario", "mixed-wear", "--tractors", "6", "--days", "2", "--seed",
                                 "3", "--start", "2026-05-04T00:00:00Z", "--out", str(out), "--truth", str(truth)])
    assert result.exit_code == 0, result.output
    doc = json.loads(truth.read_text())
    assert doc["tractors"] == [f"T{i:05d}" for i in range(1, 7)]
    assert doc["start"] == "2026-05-04T00:00:00.000Z" and doc["end"] == "2026-05-06T00:00:00.000Z"
    lines = out.read_text().splitlines()
    assert len(lines) == doc["messages"] > 0
    received = parse_ts(doc["end"])
    for line in lines:
        msg = json.loads(line)
        payload = json.dumps(msg["payload"]).encode()
        assert validate(msg["topic"], payload, now=received).rejections == []


def test_simulate_refuses_a_bad_scenario_file_with_a_clear_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('tractors = -3\ndays = 10\n[wear_mix]\nfraction = 2.0\nkinds = ["rusty"]\n')
    result = runner.invoke(app, ["simulate", "--scenario", str(bad), "--out", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "invalid scenario" in text and "tractors" in text and "wear_mix.fraction" in text and "rusty" in text


def test_simulate_names_the_shipped_scenarios_for_an_unknown_one(tmp_path: Path) -> None:
    result = runner.invoke(app, ["simulate", "--scenario", "nope", "--out", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2
    assert "unknown scenario" in result.output and "mixed-wear" in result.output


def test_simulate_refuses_an_unknown_part_in_a_scenario(tmp_path: Path) -> None:
    bad = tmp_path / "parts.toml"
    bad.write_text('tractors = 3\ndays = 2\n[[wear]]\ntractor = 1\npart = "FLUX-CAPACITOR"\nfailure_day = 1.5\n')
    result = runner.invoke(app, ["simulate", "--scenario", str(bad), "--out", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2
    assert "unknown part 'FLUX-CAPACITOR'" in " ".join(result.output.split())


def test_replay_writes_mapped_messages_and_refuses_a_bad_mapping(tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    data.write_text("id,t,p\nA1,2026-11-01T08:00:00Z,3.2\nA1,2026-11-01T08:01:00Z,3.1\n")
    good = tmp_path / "map.toml"
    good.write_text('[entity]\ncolumn = "id"\n[time]\ncolumn = "t"\n'
                    '[signals.oil_pressure_kpa]\ncolumn = "p"\nunit = "bar"\n')
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["replay", str(data), "--map", str(good), "--out", str(out)])
    assert result.exit_code == 0, result.output
    msgs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [m["topic"] for m in msgs] == ["tractors/A1/telemetry"] * 2
    assert msgs[0]["payload"]["samples"][0]["readings"] == {"oil_pressure_kpa": 320.0}

    bad = tmp_path / "bad.toml"
    bad.write_text('[entity]\ncolumn = "id"\n[time]\ncolumn = "t"\n[signals.oil_pressure_kpa]\ncolumn = "p"\n'
                   'unit = "parsec"\n')
    result = runner.invoke(app, ["replay", str(data), "--map", str(bad), "--out", str(out)])
    assert result.exit_code == 2
    assert "no conversion from 'parsec' to kPa" in " ".join(result.output.split())
    result = runner.invoke(app, ["replay", str(tmp_path / "missing.csv"), "--map", str(good), "--out", str(out)])
    assert result.exit_code == 2
    assert "cannot read" in result.output


def test_simulate_refuses_a_run_that_would_publish_future_timestamps() -> None:
    result = runner.invoke(app, ["simulate", "--scenario", "healthy", "--start", "2099-01-01T00:00:00Z"])
    assert result.exit_code == 2
    assert "in the future" in " ".join(result.output.split())

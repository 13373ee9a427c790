"""The chaos run: its building blocks in-process, and the reduced run (every process killed once) on a real stack."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fleetwatch.chaos import VICTIMS, Plan, Retention, expected, messages, schedule, slope_mib_per_h
from ingest.validate import validate

FLEETWATCH = str(Path(sys.executable).with_name("fleetwatch"))
SMALL = Plan(seed=3, tractors=2, days=1.0, kills=3, publish_s=100.0, invalid=7,
             start="2026-11-02T00:00:00+00:00")


def test_every_process_is_killed_the_asked_number_of_times_at_seeded_moments_inside_the_run() -> None:
    kills = schedule(SMALL)
    assert sorted(v for _, v in kills) == sorted(VICTIMS * 3)
    times = [t for t, _ in kills]
    assert times == sorted(times) and 0 < times[0] and times[-1] < SMALL.publish_s
    assert min(b - a for a, b in zip(times, times[1:], strict=False)) > 0
    assert schedule(SMALL) == kills
    assert schedule(Plan(**{**SMALL.__dict__, "seed": 4})) != kills


def test_the_same_plan_publishes_the_same_stream_with_the_invalid_inputs_at_the_same_places() -> None:
    first, bad = messages(SMALL)
    again, bad_again = messages(SMALL)
    assert first == again and bad == bad_again and len(bad) == SMALL.invalid
    now = datetime(2026, 11, 5, tzinfo=UTC)
    verdicts = [validate(topic, payload, now) for topic, payload in first]
    assert all(verdicts[i].message is None and verdicts[i].rejections for i in bad)
    assert all(v.message is not None and not v.rejections for i, v in enumerate(verdicts) if i not in bad)
    assert len({hashlib.sha256(first[i][1]).hexdigest() for i in bad}) == SMALL.invalid
    assert len({r.rejections[0].reason for i, r in enumerate(verdicts) if i in bad}) >= 6


def test_expected_stream_counts_every_reading_in_its_hourly_window() -> None:
    exp = expected(SMALL)
    msgs, bad = messages(SMALL)
    assert len(exp.valid) == len(msgs) - len(bad)
    readings = sum(len(s["readings"]) for m in exp.valid.values() for s in m["samples"])
    assert sum(exp.windows.values()) == readings
    assert all(start % 3600 == 0 for _, _, start in exp.windows)


def test_the_device_republishes_unacknowledged_and_recently_acknowledged_messages_in_order() -> None:
    r = Retention(seconds=30.0)
    for mid, index in ((1, 10), (2, 11), (3, 12), (4, 13)):
        r.sent(mid, index)
    for mid in (1, 2):
        r.on_ack(mid)
    r.apply(now=100.0)
    assert r.resume_point(14) == 10  # acknowledged 0 s ago: the broker may not have saved them yet
    r.on_ack(3)
    r.apply(now=125.0)
    assert r.resume_point(14) == 10 and r.unacked == 1
    r.apply(now=131.0)  # 10 and 11 are older than the retention now; 12 was acked at 125
    assert r.resume_point(14) == 12
    assert r.restart(14) == 12 and r.resume_point(14) == 14
    r.on_ack(4)  # a late ack from the connection that was dropped changes nothing
    r.apply(now=132.0)
    assert r.resume_point(14) == 14


def test_without_retention_only_unacknowledged_messages_are_republished() -> None:
    r = Retention(seconds=0.0)
    r.sent(1, 0)
    r.sent(2, 1)
    r.on_ack(1)
    r.apply(now=5.0)
    assert r.resume_point(2) == 1


def test_memory_slope_is_measured_on_the_second_half() -> None:
    warmup_then_flat = [(t, 100.0 + min(t, 100.0)) for t in range(0, 600, 10)]
    assert abs(slope_mib_per_h(warmup_then_flat)) < 1.0
    leak = [(t, 100.0 + t / 60) for t in range(0, 600, 10)]
    assert slope_mib_per_h(leak) == pytest.approx(60.0, rel=0.01)


@pytest.mark.services
def test_reduced_chaos_run_loses_and_doubles_nothing(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    run = subprocess.run([FLEETWATCH, "chaos", "--reduced", "--seed", "7", "--json", str(out)],
                         capture_output=True, text=True, env=os.environ.copy(), timeout=900)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    failed = [c for c in result["checks"] if not c["ok"]]
    assert run.returncode == 0 and not failed, (failed, run.stdout[-3000:])
    assert sorted(k["victim"] for k in result["kills"]) == sorted(VICTIMS)
    assert all(k["recovered_s"] is not None for k in result["kills"])
    figures = result["figures"]
    assert figures["lost_messages"] == 0 and figures["lost_readings"] == 0 and figures["doubled_readings"] == 0
    assert figures["duplicate_orders"] == 0
    assert figures["orders"] == figures["reference_orders"]
    assert "Reconciliation" in run.stdout

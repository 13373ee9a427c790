"""The evaluation against a hand-made ground truth: recall, on time (all and feasible), false orders, duplicates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from trends.evaluate import Order, evaluate

START = datetime(2026, 6, 1, tzinfo=UTC)
LEAD = {"OIL-PUMP": 120.0, "AIR-FILTER": 24.0}


def _iso(days: float) -> str:
    return (START + timedelta(days=days)).isoformat()


def _at(days: float) -> datetime:
    return START + timedelta(days=days)


def truth() -> dict[str, Any]:
    """Four tractors over 60 days: three wear episodes (one of them sudden, too late to order on time), one fault."""
    return {
        "start": _iso(0), "end": _iso(60), "tractors": ["T1", "T2", "T3", "T4"],
        "wear": [
            {"tractor_id": "T1", "part_id": "OIL-PUMP", "kind": "linear", "onset": _iso(10), "failure_time": _iso(40)},
            # sudden onset 3 days before failure: less than the 5-day lead time + 1 day, so never orderable on time
            {"tractor_id": "T2", "part_id": "OIL-PUMP", "kind": "sudden", "onset": _iso(30), "failure_time": _iso(33)},
            {"tractor_id": "T3", "part_id": "AIR-FILTER", "kind": "exponential", "onset": _iso(5),
             "failure_time": _iso(25)},
            # failure after the run's end + lead time: not due, ignored
            {"tractor_id": "T4", "part_id": "OIL-PUMP", "kind": "linear", "onset": _iso(50), "failure_time": _iso(90)},
        ],
        "faults": [{"tractor_id": "T4", "signal": "battery_v", "kind": "offset"}],
    }


def test_recall_and_on_time_count_the_first_order_per_episode_and_separate_infeasible_onsets() -> None:
    orders = [
        Order("T1", "OIL-PUMP", _at(30)),  # 10 days ahead: on time
        Order("T1", "OIL-PUMP", _at(31)),  # a second order for the same episode: a duplicate
        Order("T2", "OIL-PUMP", _at(31)),  # 2 days ahead of a 5-day lead: late, and the onset never allowed it
        Order("T4", "ALTERNATOR", _at(20)),  # nothing was wearing: false, on a sensor-fault tractor
    ]
    report = evaluate(truth(), orders, LEAD)
    assert len(report.episodes) == 3 and report.not_due == 1
    assert report.ordered == 2
    assert report.recall == pytest.approx(2 / 3)
    assert report.on_time_rate == pytest.approx(1 / 2)  # of all ordered: T1 on time, T2 late
    assert report.on_time_feasible_rate == 1.0  # T2 is not feasible, T3 (feasible) was never ordered
    assert report.duplicates == 1
    assert [(o.tractor_id, o.part_id) for o in report.false_orders] == [("T4", "ALTERNATOR")]
    assert report.false_on_fault_tractors == 1
    assert report.false_per_1000 == pytest.approx(1000 / (4 * 60 / 30.4375))
    assert report.by_kind["sudden"] == {"episodes": 1, "ordered": 1, "on_time": 0, "feasible": 0,
                                        "on_time_feasible": 0}
    rows = dict(report.rows())
    assert rows["recall"] == "66.7 %"


def test_an_order_after_the_failure_is_late_not_false_and_before_the_onset_is_false() -> None:
    orders = [Order("T3", "AIR-FILTER", _at(26)), Order("T1", "OIL-PUMP", _at(5))]
    report = evaluate(truth(), orders, LEAD)
    assert report.ordered == 0
    assert [(o.tractor_id, o.part_id) for o in report.false_orders] == [("T1", "OIL-PUMP")]

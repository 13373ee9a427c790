"""The fast ingest path (columnar flatten, bitmap dedupe, one-key sort) gives the detector the same input.

A straightforward reference path (pandas records → frame, a set of seen seqs per tractor, ``np.lexsort``) runs
the same batches through the same detector; windows, health, alerts and counters must come out identical.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

import trends.detect as detect
from tests.trends.test_detect import OIL_PUMP, fleet_records
from trends.detect import Detector, Outputs, Params, flatten


def reference_flatten(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The obvious way: a dict per sample, pandas builds and coerces the columns."""
    rows = []
    for r in records:
        msg = r.get("json")
        if not isinstance(msg, dict) or not isinstance(msg.get("samples"), list):
            continue
        if not isinstance(msg.get("tractor_id"), str) or not isinstance(msg.get("seq"), int):
            continue
        for sample in msg["samples"]:
            rows.append({"partition": f"{r.get('topic', '')}-{r.get('partition', 0)}", "tractor_id": msg["tractor_id"],
                         "seq": msg["seq"], "ts": sample.get("ts", ""), **(sample.get("readings") or {})})
    frame = pd.DataFrame.from_records(rows)
    ts = pd.to_datetime(pd.Series(frame["ts"], dtype="string"), utc=True, format="ISO8601", errors="coerce")
    frame["ts"] = ts.dt.as_unit("ms").astype("int64") / 1e3
    frame.loc[ts.isna(), "ts"] = np.nan
    for c in frame.columns[4:]:
        frame[c] = pd.to_numeric(frame[c], errors="coerce").astype(np.float64)
    frame["seq"] = frame["seq"].astype(np.int64)
    return frame[frame["ts"].notna()].reset_index(drop=True)


class ReferenceDetector(Detector):
    """The detector with a plain set of seen (tractor, seq) pairs for duplicates."""

    seen: set[tuple[str, int]]

    def dedupe(self, frame: pd.DataFrame, states: dict[str, dict[str, Any]], out: Outputs) -> pd.DataFrame:
        """Drop samples of messages seen in earlier batches and exact repeats within the batch."""
        before = len(frame)
        frame = frame.drop_duplicates(subset=["tractor_id", "seq", "ts"])
        pairs = list(zip(frame["tractor_id"], frame["seq"].astype(int), strict=True))
        frame = frame[[p not in self.seen for p in pairs]]
        self.seen |= set(pairs)
        out.count("duplicates_dropped", before - len(frame))
        return frame


def _run(det: Detector, records: list[dict[str, Any]], make_frame: Any, batch: int) -> dict[str, Any]:
    states: dict[str, Any] = {}
    partitions: dict[str, Any] = {}
    got: dict[str, Any] = {"windows": [], "alerts": [], "health": [], "counters": []}
    for a in range(0, len(records), batch):
        out = det.process(make_frame(records[a:a + batch]), states, partitions, states.get)
        got["windows"].append(out.windows)
        got["alerts"].append(out.alerts)
        got["health"].append(out.health)
        got["counters"].append(out.counters)
    got["partitions"] = partitions
    return got


def _noisy_fleet(days: int = 30) -> list[dict[str, Any]]:
    """Three tractors, a wearing pump, redeliveries, local reordering, a multi-sample message, odd values."""
    def level(i: int, t: float) -> float:
        return 320.0 - 170.0 * max(0.0, (t - 5) / 30) if i == 0 else 320.0

    recs = fleet_records(days, tractors=3, level=level)
    rng = np.random.default_rng(4)
    for i in rng.choice(len(recs), 300, replace=False):  # QoS 1 redeliveries, a little later
        recs.insert(min(len(recs), int(i) + int(rng.integers(0, 30))), recs[int(i)])
    blocks = [recs[i:i + 4] for i in range(0, len(recs), 4)]
    recs = [r for b in blocks for r in rng.permutation(np.array(b, dtype=object)).tolist()]
    first = recs[10]["json"]
    recs.insert(11, {"topic": "telemetry", "partition": 0, "json": {  # store-and-forward: two samples
        **first, "seq": 2_000, "samples": [first["samples"][0], {**first["samples"][0], "ts": "not a time"}]}})
    recs.insert(12, {"topic": "telemetry", "partition": 0, "json": {
        "v": 1, "tractor_id": "T00009", "seq": 1, "samples": [{"ts": first["samples"][0]["ts"], "readings": {
            "engine_rpm": "1800", "oil_pressure_kpa": None, "engine_load_pct": True, "oil_temp_c": 95}}]}})
    return recs


@pytest.mark.parametrize(("batch", "days"), [(3, 8), (37, 30), (300, 30)])
def test_fast_and_reference_ingest_give_identical_detector_output(batch: int, days: int,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    records = _noisy_fleet(days)
    fast = _run(Detector([OIL_PUMP], Params()), records, flatten, batch)
    monkeypatch.setattr(detect, "_sort_order", lambda keys: np.lexsort(keys.T[::-1]))
    ref_det = ReferenceDetector([OIL_PUMP], Params())
    ref_det.seen = set()
    ref = _run(ref_det, records, reference_flatten, batch)
    assert sum(map(len, fast["windows"])) > 100
    assert days < 30 or sum(map(len, fast["alerts"])) >= 1
    assert sum(c.get("duplicates_dropped", 0) for c in fast["counters"]) == 300
    for key in fast:
        assert fast[key] == ref[key], key


def test_flatten_matches_the_pandas_reference_on_odd_payloads() -> None:
    records = _noisy_fleet(8)[:40]
    records.append({"topic": "telemetry", "partition": 1, "json": {"v": 1, "tractor_id": "T00005", "seq": 3,
                    "samples": [{"ts": "2026-03-02T07:00:00Z", "readings": {"oil_pressure_kpa": "n/a"}},
                                {"ts": 17, "readings": {}}]}})
    fast, ref = flatten(records), reference_flatten(records)
    pd.testing.assert_frame_equal(fast[sorted(fast.columns)], ref[sorted(ref.columns)], check_dtype=False)


def test_the_dedupe_bitmap_reads_a_legacy_seq_list() -> None:
    recs = fleet_records(1, tractors=1)
    det = Detector([OIL_PUMP], Params())
    states: dict[str, Any] = {"T00001": {**detect.new_state(), "seqs": [1, 2, 3, 5]}}
    states["T00001"].pop("dd")
    out = det.process(flatten(recs[:8]), states)
    assert out.counters["duplicates_dropped"] == 4  # seqs 1, 2, 3 and 5 were seen before the upgrade
    assert "seqs" not in states["T00001"] and states["T00001"]["dd"][0] == 8

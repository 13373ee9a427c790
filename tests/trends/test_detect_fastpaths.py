"""The trend function's fast paths give what their plain counterparts give: dedupe verdicts, stored rows."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import insert, select

from tests.trends.test_detect import OIL_PUMP, fleet_records
from trends.detect import Detector, Outputs, Params, Part, _execute_many, flatten
from trends.tables import trend_state, trend_windows


def _frame(rng: np.random.Generator, tractors: int, seq_hi: int, n: int) -> pd.DataFrame:
    return pd.DataFrame({"partition": "telemetry-0",
                         "tractor_id": [f"T{int(i)}" for i in rng.integers(0, tractors, n)],
                         "seq": rng.integers(1, seq_hi, n), "ts": rng.integers(0, 50, n).astype(float),
                         "oil": rng.normal(size=n)})


@pytest.mark.parametrize("max_seqs", [64, 4096])
def test_integer_bitmap_dedupe_keeps_and_stores_what_the_numpy_bitmap_does(max_seqs: int) -> None:
    rng = np.random.default_rng(7)
    fast, plain = Detector([], Params(max_seqs=max_seqs)), Detector([], Params(max_seqs=max_seqs))
    plain.bitmap_as_int = False
    states_fast: dict[str, dict[str, Any]] = {}
    states_plain: dict[str, dict[str, Any]] = {}
    legacy = {"wm": 0.0, "dd": None, "open": None, "sig": {}, "episodes": {}, "replaced": {}, "seqs": [3, 5, 9]}
    states_fast["T0"], states_plain["T0"] = copy.deepcopy(legacy), copy.deepcopy(legacy)
    seq_hi = 40
    for _ in range(60):  # seqs jump ahead, repeat, arrive late and fall out of the bitmap's range
        seq_hi += int(rng.integers(0, 3 * max_seqs // 2 if rng.random() < 0.1 else 30))
        frame = _frame(rng, 6, seq_hi, 40)
        for tid in frame["tractor_id"].unique():
            states_fast.setdefault(tid, {"wm": 0.0, "dd": None, "open": None, "sig": {}, "episodes": {},
                                         "replaced": {}})
            states_plain.setdefault(tid, copy.deepcopy(states_fast[tid]))
        kept_fast = fast.dedupe(frame, states_fast, Outputs())
        kept_plain = plain.dedupe(frame, states_plain, Outputs())
        pd.testing.assert_frame_equal(kept_fast, kept_plain)
        assert states_fast == states_plain
        if rng.random() < 0.2:  # a state reloaded from the table: same text, a new object
            for st in states_fast.values():
                if st.get("dd"):
                    st["dd"] = [st["dd"][0], "".join(list(st["dd"][1]))]


def _window_rows(n: int) -> list[dict[str, Any]]:
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    return [{"tractor_id": f"T{i % 7}", "signal": f"s{i // 7}", "window_start": t0 + timedelta(seconds=10 * (i % 3)),
             "window_end": t0 + timedelta(seconds=10 * (i % 3) + 10), "count": i, "mean": i / 3, "min": -0.0,
             "max": 1e300, "std": 0.1 * i, "n_used": None if i % 2 else i, "norm_value": None, "level": 1.5,
             "slope_per_h": None, "slope_lo": -1e-9, "slope_hi": None, "quality_flags": "stuck" if i % 5 else ""}
            for i in range(n)]


def test_driver_executemany_stores_the_rows_sqlalchemy_would(tmp_path: Path) -> None:
    from fleetwatch.db import upgrade
    from functions.db import make_engine, make_sessions

    stored = []
    for name, fast in (("plain", False), ("fast", True)):
        url = f"sqlite:///{tmp_path / f'{name}.db'}"
        upgrade(url)
        engine = make_engine(url)
        states = [{"tractor_id": f"T{i}", "state": {"sig": {"oil": {"sigma": float("nan"), "k": [1, 2.5]}}},
                   "live": {"wm": 1.0 * i, "dd": [i, "AAA="]}, "generation": i + 1,
                   "updated_at": datetime(2026, 3, 1, 12, 0, i, 123456, tzinfo=UTC)} for i in range(5)]
        with make_sessions(engine)() as session:
            if fast:
                _execute_many(session, "test-windows", insert(trend_windows), _window_rows(50))
                _execute_many(session, "test-states", insert(trend_state), states)
            else:
                session.execute(insert(trend_windows), _window_rows(50))
                session.execute(insert(trend_state), states)
            session.commit()
        with engine.connect() as conn:  # the stored text itself, not SQLAlchemy's reading of it
            stored.append([conn.exec_driver_sql(f"SELECT * FROM {t} ORDER BY 1, 2, 3").all()
                           for t in ("trend_windows", "trend_state")])
            states_read = conn.execute(select(trend_state.c.state)).scalars().all()
        engine.dispose()
    windows_plain, states_plain = stored[0]
    windows_fast, states_fast = stored[1]
    assert windows_fast == windows_plain and len(windows_fast) == 50
    assert [r[2:] for r in states_fast] == [r[2:] for r in states_plain]  # updated_at, live, generation
    assert len(states_read) == 5


def _run_batches(det: Detector, records: list[dict[str, Any]], batch: int) -> tuple[Any, ...]:
    states: dict[str, Any] = {}
    partitions: dict[str, Any] = {}
    windows, alerts, health = [], [], []
    for a in range(0, len(records), batch):
        out = det.process(flatten(records[a:a + batch]), states, partitions, lambda t: states.get(t))
        windows += out.windows
        alerts += out.alerts
        health += list(out.health.items())
    return json.dumps([states, partitions], sort_keys=True), windows, alerts, health


@pytest.mark.parametrize("batch", [37, 300])
def test_closing_every_tractor_in_one_pass_gives_what_closing_each_in_turn_gives(batch: int) -> None:
    def level(i: int, t: float) -> float:  # one pump wears, one jumps, the rest stay healthy
        return 320.0 - 170.0 * max(0.0, (t - 5) / 30) if i == 0 else (250.0 if i == 1 and t > 12 else 320.0)

    records = fleet_records(24, tractors=4, level=level, offset=(2, 8, 25.0))
    together = Detector([OIL_PUMP], Params())
    each = Detector([OIL_PUMP], Params())
    each.close_together = False
    got, want = _run_batches(together, records, batch), _run_batches(each, records, batch)
    assert got[1] and got[2]  # windows closed and alerts raised: the comparison covers both
    assert got == want


@pytest.mark.services
def test_trend_rows_copied_into_postgresql_read_back_as_inserted_ones(pg_url: str) -> None:
    from fleetwatch.db import upgrade
    from functions.db import make_engine, make_sessions

    upgrade(pg_url)
    engine = make_engine(pg_url)
    rows = _window_rows(50)
    copied = [dict(r, tractor_id="COPY-" + r["tractor_id"]) for r in rows]
    copied[3]["norm_value"] = float("nan")
    plain = [dict(r, norm_value=float("nan")) if i == 3 else r for i, r in enumerate(rows)]
    try:
        with make_sessions(engine)() as session:
            _execute_many(session, "test-copy", insert(trend_windows), copied, copy=True)
            session.execute(insert(trend_windows), plain)
            session.commit()
        with engine.connect() as conn:
            got = conn.execute(select(trend_windows).order_by(trend_windows.c.tractor_id, trend_windows.c.signal,
                                                              trend_windows.c.window_start)).mappings().all()
    finally:
        engine.dispose()
    by_copy = [dict(r, tractor_id=r["tractor_id"][5:]) for r in got if r["tractor_id"].startswith("COPY-")]
    by_insert = [dict(r) for r in got if not r["tractor_id"].startswith("COPY-")]
    assert len(by_copy) == 50
    assert json.dumps(by_copy, default=str) == json.dumps(by_insert, default=str)


@pytest.mark.parametrize("batch", [40, 300])
def test_working_out_first_windows_and_trend_fits_for_all_tractors_at_once_gives_the_window_by_window_close(
        batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # A wearing pump (alerts), a calibration step (rejected windows, a change), a noise burst (noisy windows);
    # batches of 300 close several windows of one tractor at once (only a tractor × signal's first is worked
    # out ahead, and only one closing alone has its trend fitted with the others').
    def level(i: int, t: float) -> float:
        return 320.0 - 170.0 * max(0.0, (t - 5) / 30) if i == 0 else 320.0

    records = fleet_records(30, tractors=4, level=level, offset=(2, 8, 150.0))
    rng = np.random.default_rng(11)
    for rec in records[4 * 40 * 12:4 * 40 * 13]:  # day 12: tractor 4's sensor scatters widely
        doc = rec["json"]
        if doc["tractor_id"] == "T00004":
            doc["samples"][0]["readings"]["oil_pressure_kpa"] += round(float(rng.normal(0, 25.0)), 1)
    ahead, plain = Detector([OIL_PUMP], Params()), Detector([OIL_PUMP], Params())
    plain.precompute = plain.batch_fits = False
    worked_out: list[int] = []
    batched: list[int] = []
    precompute, flush = Detector._precompute, Detector._flush_fits

    def counting(self: Detector, c: Any, codes: np.ndarray, sig_codes: np.ndarray, sts: list[dict[str, Any]]) -> None:
        precompute(self, c, codes, sig_codes, sts)
        worked_out.append(len(c.fast))

    def counting_fits(self: Detector, out: Outputs) -> None:
        batched.append(len(self._fits or []))
        flush(self, out)

    monkeypatch.setattr(Detector, "_precompute", counting)
    monkeypatch.setattr(Detector, "_flush_fits", counting_fits)
    got = _run_batches(ahead, records, batch)
    monkeypatch.undo()
    want = _run_batches(plain, records, batch)
    flags = {f for w in got[1] for f in w["quality_flags"].split(",") if f}
    assert {"noisy", "rejected", "change"} <= flags and got[2]
    wear = sum(w["signal"] == OIL_PUMP.signal for w in got[1])
    assert sum(worked_out) > wear // 2  # most wear-signal windows took the worked-out path
    assert sum(batched) > wear // 8  # a trend is refitted every 4 windows (or at a day's end)
    assert got == want


def test_the_worked_out_close_of_every_catalog_signal_gives_the_window_by_window_close() -> None:
    # The shipped catalog: channels of one shape but their own covariate scales, all closing in one pass.
    from types import SimpleNamespace

    from bench.common import fleet_messages
    from fleetwatch.db import CATALOG, load_catalog

    parts = [Part.from_row(SimpleNamespace(**r, extra=dict(r))) for r in load_catalog(CATALOG)]
    params = Params(window_s=10, lateness_s=2, history=48)
    records = [{"topic": "telemetry", "partition": i % 3, "json": json.loads(v)}
               for i, (_, v) in enumerate(fleet_messages(30, 240, start=datetime(2026, 3, 1, tzinfo=UTC)))]
    ahead, plain = Detector(parts, params), Detector(parts, params)
    plain.precompute = plain.batch_fits = False
    got, want = _run_batches(ahead, records, 600), _run_batches(plain, records, 600)
    assert len({w["signal"] for w in got[1] if w["norm_value"] is not None}) >= 6
    assert got == want

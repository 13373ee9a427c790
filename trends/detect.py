"""The trend-detecting function: event-time windows per tractor × signal, trends, wear alerts."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.orm import Session

from functions.model import Context
from trends.maths import Trend, fit_trend, health, hours_to_threshold
from trends.tables import part_health, trend_state, trend_windows

ALERT_TOPIC = "wear-alerts"
MAX_SEQS = 4096


@dataclass(frozen=True)
class Part:
    """A catalog part as the detector needs it."""

    part_id: str
    signal: str
    direction: str
    nominal: float
    warning: float
    failure: float
    lead_time_h: float


@dataclass(frozen=True)
class Params:
    """Detector tuning, from the function's ``params`` table."""

    window_s: int = 3600
    lateness_s: int = 900
    history: int = 48
    min_windows: int = 24
    margin_h: float = 48.0
    realert_windows: int = 24

    @classmethod
    def from_context(cls, params: dict[str, Any]) -> Params:
        """Params from a function's params, ignoring keys it does not know."""
        known = {k: v for k, v in params.items() if k in cls.__dataclass_fields__}
        return cls(**known)


_catalog: tuple[float, list[Part]] = (0.0, [])


def load_parts(session: Session, max_age_s: float = 30.0) -> list[Part]:
    """Catalog parts (cached briefly: the catalog changes rarely)."""
    global _catalog
    if time.monotonic() - _catalog[0] < max_age_s and _catalog[1]:
        return _catalog[1]
    rows = session.execute(text(
        "SELECT part_id, signal, direction, nominal, warning_threshold, failure_threshold, lead_time_h FROM parts"))
    parts = [Part(*row) for row in rows]
    _catalog = (time.monotonic(), parts)
    return parts


def _dt(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def flatten(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per reading: tractor_id, seq, ts (epoch s), signal, value."""
    tractor: list[str] = []
    seq: list[int] = []
    ts: list[str] = []
    sig: list[str] = []
    val: list[float] = []
    for r in records:
        msg = r.get("json")
        if not isinstance(msg, dict):
            continue
        tid, s = msg["tractor_id"], msg["seq"]
        for sample in msg["samples"]:
            readings = sample["readings"]
            n = len(readings)
            tractor += [tid] * n
            seq += [s] * n
            ts += [sample["ts"]] * n
            sig += readings.keys()
            val += readings.values()
    frame = pd.DataFrame({"tractor_id": tractor, "seq": np.asarray(seq, dtype=np.int64),
                          "ts": pd.to_datetime(pd.Series(ts, dtype="string"), utc=True, format="ISO8601"),
                          "signal": sig, "value": np.asarray(val, dtype=np.float64)})
    # Seconds since the epoch; pin the unit because pandas picks the resolution from the input.
    frame["ts"] = frame["ts"].dt.as_unit("ms").astype("int64") / 1e3
    return frame


def _load_states(session: Session, tractor_ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = session.execute(select(trend_state.c.tractor_id, trend_state.c.state)
                           .where(trend_state.c.tractor_id.in_(tractor_ids)))
    return {tid: (st if isinstance(st, dict) else json.loads(st)) for tid, st in rows}


def _save_states(session: Session, states: dict[str, dict[str, Any]], existing: set[str]) -> None:
    now = datetime.now(UTC)
    for tid, st in states.items():
        if tid in existing:
            session.execute(update(trend_state).where(trend_state.c.tractor_id == tid)
                            .values(state=st, updated_at=now))
        else:
            session.execute(insert(trend_state).values(tractor_id=tid, state=st, updated_at=now))


def _new_state() -> dict[str, Any]:
    return {"wm": 0.0, "seqs": [], "open": {}, "hist": {}, "episodes": {}}


def _dedupe(frame: pd.DataFrame, states: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Drop readings of messages already seen (QoS 1 and bridge redelivery duplicates)."""
    msgs = frame[["tractor_id", "seq"]].drop_duplicates()
    seen_pairs = {(tid, s) for tid, st in states.items() for s in st["seqs"]}
    fresh = [(t, s) not in seen_pairs for t, s in zip(msgs["tractor_id"], msgs["seq"], strict=True)]
    keep = msgs[fresh]
    for tid, group in keep.groupby("tractor_id"):
        st = states[tid]
        st["seqs"] = sorted(set(st["seqs"]) | set(group["seq"].tolist()))[-MAX_SEQS:]
    return frame.merge(keep, on=["tractor_id", "seq"], how="inner")


def handler(event: dict[str, Any], context: Context) -> None:
    """Update windows and trends for a batch of telemetry; write trend rows; emit wear alerts."""
    session = context.session
    assert session is not None, "trends.detect needs a transactional function"
    params = Params.from_context(context.params)
    records = [r for recs in event["records"].values() for r in recs]
    frame = flatten(records)
    if frame.empty:
        return
    tractor_ids = sorted(frame["tractor_id"].unique().tolist())
    loaded = _load_states(session, tractor_ids)
    states = {tid: loaded.get(tid) or _new_state() for tid in tractor_ids}
    frame = _dedupe(frame, states)
    context.metrics.incr("readings", len(frame))
    if frame.empty:
        _save_states(session, states, set(loaded))
        return

    # Aggregate the whole batch per (tractor, signal, window) in one vectorised pass.
    frame["w"] = (frame["ts"] // params.window_s).astype(np.int64) * params.window_s
    frame["sq"] = frame["value"] ** 2
    agg = frame.groupby(["tractor_id", "signal", "w"], sort=True).agg(
        n=("value", "size"), s=("value", "sum"), ss=("sq", "sum"), lo=("value", "min"), hi=("value", "max"))
    watermarks = frame.groupby("tractor_id")["ts"].max()

    for (tid, sig, w), row in zip(agg.index, agg.itertuples(index=False), strict=True):
        st = states[tid]
        windows = st["open"].setdefault(sig, {})
        key = str(int(w))
        if int(w) + params.window_s + params.lateness_s <= st["wm"] and key not in windows:
            context.metrics.incr("late_readings_dropped", int(row.n))
            continue
        acc = windows.get(key)
        if acc is None:
            windows[key] = [int(row.n), float(row.s), float(row.ss), float(row.lo), float(row.hi)]
        else:
            acc[0] += int(row.n)
            acc[1] += float(row.s)
            acc[2] += float(row.ss)
            acc[3] = min(acc[3], float(row.lo))
            acc[4] = max(acc[4], float(row.hi))

    parts = load_parts(session)
    parts_by_signal: dict[str, list[Part]] = {}
    for p in parts:
        parts_by_signal.setdefault(p.signal, []).append(p)
    window_rows: list[dict[str, Any]] = []
    for tid in tractor_ids:
        st = states[tid]
        st["wm"] = max(st["wm"], float(watermarks.get(tid, 0.0)))
        _close_windows(tid, st, params, parts_by_signal, window_rows, session, context)
    if window_rows:
        session.execute(insert(trend_windows), window_rows)
        context.metrics.incr("windows_closed", len(window_rows))
    _save_states(session, states, set(loaded))


def _close_windows(tid: str, st: dict[str, Any], params: Params, parts_by_signal: dict[str, list[Part]],
                   out: list[dict[str, Any]], session: Session, context: Context) -> None:
    for sig, windows in st["open"].items():
        closable = sorted(int(k) for k in windows if int(k) + params.window_s + params.lateness_s <= st["wm"])
        for w in closable:
            n, s, ss, lo, hi = windows.pop(str(w))
            mean = s / n
            std = float(np.sqrt(max(ss / n - mean * mean, 0.0)))
            hist = st["hist"].setdefault(sig, [])
            hist.append([(w + params.window_s / 2) / 3600.0, mean])
            del hist[:-params.history]
            arr = np.asarray(hist, dtype=np.float64)
            trend = fit_trend(arr[:, 0], arr[:, 1]) if len(hist) >= params.min_windows else None
            out.append({"tractor_id": tid, "signal": sig, "window_start": _dt(w),
                        "window_end": _dt(w + params.window_s), "count": int(n), "mean": mean, "min": lo,
                        "max": hi, "std": std, "norm_value": mean,
                        "slope_per_h": trend.slope if trend else None,
                        "slope_lo": trend.slope_lo if trend else None,
                        "slope_hi": trend.slope_hi if trend else None,
                        "quality_flags": "" if n >= 3 else "sparse"})
            if trend is None:
                continue
            for part in parts_by_signal.get(sig, []):
                _assess(tid, st, part, trend, w + params.window_s, sig, params, session, context)


def _assess(tid: str, st: dict[str, Any], part: Part, trend: Trend, window_end: float, sig: str,
            params: Params, session: Session, context: Context) -> None:
    expected, earliest = hours_to_threshold(trend, part.failure, part.direction)
    heading = trend.slope_hi < 0 if part.direction == "falling" else trend.slope_lo > 0
    beyond_warning = trend.level <= part.warning if part.direction == "falling" else trend.level >= part.warning
    due = expected is not None and expected <= part.lead_time_h + params.margin_h
    alerting = heading and (due or beyond_warning)
    status = "alert" if alerting else ("warning" if beyond_warning or (heading and due) else "ok")
    values = {"signal": sig, "level": trend.level, "health": health(trend.level, part.nominal, part.failure),
              "slope_per_h": trend.slope, "ttf_h": expected, "ttf_lo_h": earliest, "status": status,
              "as_of": _dt(window_end)}
    updated = session.execute(update(part_health).where(
        (part_health.c.tractor_id == tid) & (part_health.c.part_id == part.part_id)).values(**values))
    if updated.rowcount == 0:  # type: ignore[attr-defined]
        session.execute(insert(part_health).values(tractor_id=tid, part_id=part.part_id, **values))
    if not alerting:
        return
    episodes = st["episodes"]
    episode = episodes.get(part.part_id)
    if episode is None:
        episode = {"id": f"{tid}:{part.part_id}:{int(window_end)}", "since": window_end, "alerts": 0,
                   "last_end": 0.0}
        episodes[part.part_id] = episode
    elif window_end - episode["last_end"] < params.realert_windows * params.window_s:
        return
    episode["alerts"] += 1
    episode["last_end"] = window_end
    alert = {
        "alert_id": f"{episode['id']}#{episode['alerts']}",
        "episode_id": episode["id"],
        "tractor_id": tid,
        "part_id": part.part_id,
        "signal": sig,
        "level": trend.level,
        "slope_per_h": trend.slope,
        "slope_ci_per_h": [trend.slope_lo, trend.slope_hi],
        "ttf_h": expected,
        "ttf_earliest_h": earliest,
        "failure_threshold": part.failure,
        "lead_time_h": part.lead_time_h,
        "detected_at": _dt(window_end).isoformat(),
        "window_ids": [f"{tid}:{sig}:{_dt(window_end - params.window_s).isoformat()}"],
    }
    context.emit(ALERT_TOPIC, tid, alert)
    context.metrics.incr("alerts")


def reset_part(session: Session, tractor_id: str, part_id: str, signal: str) -> None:
    """Forget the trend baseline and alert episode of one part (after it was replaced)."""
    row = session.execute(select(trend_state.c.state).where(trend_state.c.tractor_id == tractor_id)).first()
    if row is None:
        return
    st = row[0] if isinstance(row[0], dict) else json.loads(row[0])
    st["episodes"].pop(part_id, None)
    st["hist"].pop(signal, None)
    session.execute(update(trend_state).where(trend_state.c.tractor_id == tractor_id)
                    .values(state=st, updated_at=datetime.now(UTC)))
    session.execute(delete(part_health).where((part_health.c.tractor_id == tractor_id)
                                              & (part_health.c.part_id == part_id)))

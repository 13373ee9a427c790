"""Analyst access to the trend tables: tidy pandas DataFrames of windows and of the fleet's worst parts."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pandas as pd
from sqlalchemy import Engine, select, text

from trends.tables import trend_windows

WINDOW_COLUMNS = ["tractor_id", "signal", "window_start", "window_end", "count", "mean", "min", "max", "std",
                  "n_used", "norm_value", "level", "slope_per_h", "slope_lo", "slope_hi", "quality_flags"]
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(value: str | None, now: datetime | None = None) -> datetime | None:
    """``30d``, ``12h``, ``2w`` (relative to now) or an ISO-8601 timestamp → a UTC datetime; ValueError otherwise."""
    if value is None or value == "":
        return None
    m = _DURATION.match(value)
    if m:
        return (now or datetime.now(UTC)) - timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2)])
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {value!r}: give a duration like 30d, 12h, 2w or an ISO-8601 time") from None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def trend_frame(engine: Engine, tractor: str | None = None, signal: str | None = None,
                since: datetime | str | None = None, until: datetime | None = None,
                limit: int | None = None) -> pd.DataFrame:
    """Closed trend windows as a tidy DataFrame: one row per (tractor, signal, window), oldest first.

    Timestamps are timezone-aware UTC; ``quality_flags`` is a comma-separated string ("" = clean).
    The filters hit the primary key (tractor_id, signal, window_start), so one tractor's history is
    an index range scan even at 100 million rows.
    """
    since_ts = parse_since(since) if isinstance(since, str) else since
    q = select(*[trend_windows.c[c] for c in WINDOW_COLUMNS])
    if tractor:
        q = q.where(trend_windows.c.tractor_id == tractor)
    if signal:
        q = q.where(trend_windows.c.signal == signal)
    if since_ts is not None:
        q = q.where(trend_windows.c.window_start >= since_ts)
    if until is not None:
        q = q.where(trend_windows.c.window_start < until)
    q = q.order_by(trend_windows.c.tractor_id, trend_windows.c.signal, trend_windows.c.window_start)
    if limit:
        q = q.limit(limit)
    with engine.connect() as conn:
        frame = pd.DataFrame(conn.execute(q).fetchall(), columns=WINDOW_COLUMNS)
    for col in ("window_start", "window_end"):
        frame[col] = pd.to_datetime(frame[col], utc=True)
    for col in ("count", "n_used"):
        frame[col] = frame[col].astype("Int64")
    numeric = ["mean", "min", "max", "std", "norm_value", "level", "slope_per_h", "slope_lo", "slope_hi"]
    frame[numeric] = frame[numeric].astype("float64")
    frame["quality_flags"] = frame["quality_flags"].fillna("").astype("string")
    return frame


def worst_parts(engine: Engine, limit: int = 20) -> pd.DataFrame:
    """The fleet's least healthy parts (view ``v_worst_parts``), worst first."""
    with engine.connect() as conn:
        result = conn.execute(text("SELECT * FROM v_worst_parts ORDER BY fleet_rank, tractor_id, part_id LIMIT :n"),
                              {"n": limit})
        return pd.DataFrame(result.fetchall(), columns=list(result.keys()))

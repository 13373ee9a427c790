"""Trend maths: robust slope with a confidence interval and time-to-threshold forecasts (numpy)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Two-sided 95 % Student-t quantiles by degrees of freedom; past 30 the normal value is close enough.
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
        12: 2.18, 15: 2.13, 20: 2.09, 25: 2.06, 30: 2.04}


def t95(dof: int) -> float:
    """95 % two-sided Student-t quantile for ``dof`` degrees of freedom."""
    if dof >= 30:
        return 1.96 + 2.4 / dof
    return _T95[max(k for k in _T95 if k <= max(dof, 1))]


@dataclass(frozen=True)
class Trend:
    """A fitted line over recent windows: level at the last point and slope per hour with a 95 % CI."""

    level: float
    slope: float
    slope_lo: float
    slope_hi: float
    n: int


def fit_trend(t_h: np.ndarray, y: np.ndarray) -> Trend | None:
    """Theil–Sen slope (robust to outlier windows) with a least-squares 95 % CI; None under 3 points."""
    n = len(t_h)
    if n < 3:
        return None
    i, j = np.triu_indices(n, k=1)
    dt = t_h[j] - t_h[i]
    ok = dt > 0
    if not ok.any():
        return None
    slope = float(np.median((y[j] - y[i])[ok] / dt[ok]))
    intercept = float(np.median(y - slope * t_h))
    resid = y - (intercept + slope * t_h)
    sxx = float(((t_h - t_h.mean()) ** 2).sum())
    if sxx <= 0:
        return None
    se = math.sqrt(float((resid**2).sum()) / max(n - 2, 1) / sxx)
    half = t95(n - 2) * se
    level = intercept + slope * float(t_h[-1])
    return Trend(level=level, slope=slope, slope_lo=slope - half, slope_hi=slope + half, n=n)


def hours_to_threshold(trend: Trend, threshold: float, direction: str) -> tuple[float | None, float | None]:
    """(expected, earliest plausible) hours until the level crosses ``threshold``; None if not heading there.

    ``direction`` is "falling" when the part fails as the signal drops below the threshold,
    "rising" when it fails as the signal climbs above it.
    """
    sign = -1.0 if direction == "falling" else 1.0
    gap = sign * (threshold - trend.level)  # > 0 while the threshold is still ahead
    if gap <= 0:
        return 0.0, 0.0
    rate = sign * trend.slope  # > 0 when heading toward the threshold
    fastest = max(sign * trend.slope_lo, sign * trend.slope_hi)
    expected = gap / rate if rate > 0 else None
    earliest = gap / fastest if fastest > 0 else None
    return expected, earliest


def health(level: float, nominal: float, failure: float) -> float:
    """1 at the nominal level, 0 at the failure threshold, clipped to [0, 1]."""
    span = nominal - failure
    if span == 0:
        return 0.0
    return float(min(1.0, max(0.0, (level - failure) / span)))

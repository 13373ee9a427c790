"""Trend maths (numpy): robust slope with a CI, change detection, condition normalisation, forecasts."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

# Two-sided 95 % Student-t quantiles by degrees of freedom; past 30 the normal value is close enough.
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
        12: 2.18, 15: 2.13, 20: 2.09, 25: 2.06, 30: 2.04}
MAD_TO_SIGMA = 1.4826


_T95_BY_DOF = [_T95[max(k for k in _T95 if k <= max(d, 1))] for d in range(30)]


def t95(dof: int) -> float:
    """95 % two-sided Student-t quantile for ``dof`` degrees of freedom."""
    if dof >= 30:
        return 1.96 + 2.4 / dof
    return _T95_BY_DOF[max(dof, 0)]


def _median(x: np.ndarray) -> float:
    """Median via one partition (np.median's generality costs more than the work on short arrays)."""
    n = len(x)
    h = n // 2
    if n % 2:
        return float(np.partition(x, h)[h])
    part = np.partition(x, (h - 1, h))
    return float(0.5 * (part[h - 1] + part[h]))


@dataclass(frozen=True)
class Trend:
    """A fitted line over recent windows: level at the last point, slope per hour with a 95 % CI, noise scale."""

    level: float
    slope: float
    slope_lo: float
    slope_hi: float
    n: int
    scale: float = 0.0  # robust standard deviation of the residuals around the line


def robust_scale(x: np.ndarray) -> float:
    """Standard deviation estimated from the median absolute deviation (immune to a few outliers)."""
    if len(x) == 0:
        return 0.0
    return float(MAD_TO_SIGMA * _median(np.abs(x - _median(x))))


@functools.lru_cache(maxsize=128)
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs i < j of n points (cached: trends are refitted over the same few lengths)."""
    return np.triu_indices(n, k=1)


def fit_trend(t_h: np.ndarray, y: np.ndarray) -> Trend | None:
    """Theil–Sen slope (robust to outlier windows) with a 95 % CI from the robust residual scale.

    Returns None under 3 points or when all points share one time.
    """
    t_h = np.asarray(t_h, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(t_h)
    if n < 3:
        return None
    i, j = _pairs(n)
    dt = t_h[j] - t_h[i]
    ok = dt > 0
    if not ok.any():
        return None
    slope = _median((y[j] - y[i])[ok] / dt[ok])
    intercept = _median(y - slope * t_h)
    resid = y - (intercept + slope * t_h)
    sxx = float(((t_h - t_h.mean()) ** 2).sum())
    if sxx <= 0:
        return None
    rms = math.sqrt(float((resid**2).sum()) / max(n - 2, 1))
    scale = robust_scale(resid)
    # The robust scale ignores outlier windows; the RMS guards against a MAD of zero on stuck-flat data.
    sigma = scale if scale > 0 else rms
    half = t95(n - 2) * sigma / math.sqrt(sxx)
    if n >= 6:
        # Residuals that wander together (weather, slow state) make a line look surer than it is: widen the
        # interval by the AR(1) variance factor of the residuals' lag-1 autocorrelation.
        r0 = resid - resid.mean()
        denom = float((r0 * r0).sum())
        rho = float((r0[1:] * r0[:-1]).sum()) / denom if denom > 0 else 0.0
        rho = min(max(rho, 0.0), 0.9)
        half *= math.sqrt((1 + rho) / (1 - rho))
    level = intercept + slope * float(t_h[-1])
    return Trend(level=level, slope=slope, slope_lo=slope - half, slope_hi=slope + half, n=n, scale=sigma)


def _medians(x: np.ndarray) -> np.ndarray:
    """``_median`` of each row of a matrix (the same selection and the same average, so the same floats)."""
    n = x.shape[1]
    h = n // 2
    if n % 2:
        return np.partition(x, h, axis=1)[:, h]
    part = np.partition(x, (h - 1, h), axis=1)
    return 0.5 * (part[:, h - 1] + part[:, h])


def fit_trends(t_h: np.ndarray, y: np.ndarray) -> list[Trend | None]:
    """``fit_trend`` of each row of two (series × points) matrices, numpy across the series.

    Many tractors refit their trends over the same number of windows in one batch; one call per series cost
    ~60 µs, nearly all of it numpy's per-call overhead. Every operation is ``fit_trend``'s, row by row (the row
    reductions sum in the same order as a 1-D array's), so each result is the very Trend it returns; a series
    with two points at one time goes through ``fit_trend`` itself.
    """
    # Contiguous rows: each row's reductions then sum in a 1-D array's order, whatever views the caller passes.
    t_h = np.ascontiguousarray(t_h, dtype=np.float64)
    y = np.ascontiguousarray(y, dtype=np.float64)
    m, n = t_h.shape
    if n < 3 or m == 0:
        return [None] * m
    i, j = _pairs(n)
    dt = t_h[:, j] - t_h[:, i]
    plain = (dt > 0).all(axis=1)
    # Rows fit_trend would have turned away early (points at one time: infinite slopes) must not warn here.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        slope = _medians((y[:, j] - y[:, i]) / dt)
        intercept = _medians(y - slope[:, None] * t_h)
        resid = y - (intercept[:, None] + slope[:, None] * t_h)
        sxx = ((t_h - t_h.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
        sq = (resid**2).sum(axis=1)
        scale = MAD_TO_SIGMA * _medians(np.abs(resid - _medians(resid)[:, None]))
        if n >= 6:
            r0 = resid - resid.mean(axis=1, keepdims=True)
            denom = (r0 * r0).sum(axis=1)
            lag = (r0[:, 1:] * r0[:, :-1]).sum(axis=1)
    out: list[Trend | None] = []
    t95n = t95(n - 2)
    last = t_h[:, -1].tolist()
    for r, (ok, sl, ic, xx, ss, sc) in enumerate(zip(plain.tolist(), slope.tolist(), intercept.tolist(),
                                                      sxx.tolist(), sq.tolist(), scale.tolist(), strict=True)):
        if not ok:
            out.append(fit_trend(t_h[r], y[r]))
            continue
        if xx <= 0:
            out.append(None)
            continue
        sigma = sc if sc > 0 else math.sqrt(ss / max(n - 2, 1))
        half = t95n * sigma / math.sqrt(xx)
        if n >= 6:
            d = float(denom[r])
            rho = float(lag[r]) / d if d > 0 else 0.0
            rho = min(max(rho, 0.0), 0.9)
            half *= math.sqrt((1 + rho) / (1 - rho))
        out.append(Trend(level=ic + sl * last[r], slope=sl, slope_lo=sl - half, slope_hi=sl + half, n=n, scale=sigma))
    return out


def fit_growth(t_h: np.ndarray, progress: np.ndarray, floor: float = 0.05) -> Trend | None:
    """Exponential growth of wear progress: a Theil–Sen line through log(progress) of the points above ``floor``.

    ``progress`` is the share of the way from the baseline to the failure threshold (1 = failure). The returned
    trend lives in log-progress space: ``level`` = log(progress) now, ``slope`` = growth rate per hour.
    """
    t_h = np.asarray(t_h, dtype=np.float64)
    progress = np.asarray(progress, dtype=np.float64)
    keep = progress > floor
    if keep.sum() < 3:
        return None
    return fit_trend(t_h[keep], np.log(progress[keep]))


def growth_forecast(growth: Trend) -> Forecast:
    """Hours until exponential growth (``fit_growth``) reaches progress 1: expected and a 95 % range."""
    gap = -growth.level
    if gap <= 0:
        return Forecast(0.0, 0.0, 0.0)
    return Forecast(expected=gap / growth.slope if growth.slope > 0 else None,
                    earliest=gap / growth.slope_hi if growth.slope_hi > 0 else None,
                    latest=gap / growth.slope_lo if growth.slope_lo > 0 else None)


def cusum_step(pos: float, neg: float, z: float, k: float = 0.5, clip: float = 3.0) -> tuple[float, float]:
    """One step of a two-sided CUSUM on a standardised residual ``z`` (clipped so one spike cannot alarm)."""
    z = max(-clip, min(clip, z))
    return max(0.0, pos + z - k), max(0.0, neg - z - k)


def cusum_alarm(z: np.ndarray, k: float = 0.5, h: float = 8.0, clip: float = 3.0) -> int | None:
    """Index of the first CUSUM alarm over standardised residuals ``z``, or None."""
    pos = neg = 0.0
    for idx, value in enumerate(np.asarray(z, dtype=np.float64)):
        pos, neg = cusum_step(pos, neg, float(value), k, clip)
        if pos > h or neg > h:
            return idx
    return None


def moments(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Moment matrix Σ z zᵀ of z = [1, x₁ … x_k, y] over samples: a regression's sufficient statistics."""
    z = np.column_stack([np.ones(len(y)), x, y])
    return z.T @ z


def solve_moments(s: list[float], size: int, scales_sq: list[float], ridge: float) -> tuple[list[float], float] | None:
    """Least-squares fit of y on covariates from a moment matrix: ([intercept, *beta], residual sigma).

    ``s`` is the row-major ``size`` × ``size`` matrix of [1, covariates centred on the reference, y]; sigma is the
    residual standard deviation of single samples. ``scales_sq`` are the covariates' squared typical magnitudes: a
    small ridge of ``ridge · n · scale²`` keeps the fit stable when a covariate hardly varies (it then gets a
    coefficient near zero). A window's refit solves at most a 4 × 4 system, where numpy's per-call overhead cost
    more than the arithmetic: this is Gaussian elimination with partial pivoting (what LAPACK's solve does) in
    Python. None when there are too few samples or the system is singular.
    """
    k = size - 2
    n = s[0]
    if n < k + 3:
        return None
    q = k + 1  # unknowns: intercept and k covariate coefficients
    rows = [s[i * size: (i + 1) * size] for i in range(q)]  # [A | b]: b is the y column (index q)
    for i in range(1, q):
        rows[i][i] += ridge * n * scales_sq[i - 1]
    for col in range(q):
        pivot, big = col, abs(rows[col][col])
        for r in range(col + 1, q):
            if abs(rows[r][col]) > big:
                pivot, big = r, abs(rows[r][col])
        if big == 0.0:
            return None
        if pivot != col:
            rows[col], rows[pivot] = rows[pivot], rows[col]
        top = rows[col]
        for r in range(col + 1, q):
            row = rows[r]
            f = row[col] / top[col]
            if f:
                for j in range(col + 1, size):
                    row[j] -= f * top[j]
    coef = [0.0] * q
    for i in range(q - 1, -1, -1):
        row = rows[i]
        acc = row[q]
        for j in range(i + 1, q):
            acc -= row[j] * coef[j]
        coef[i] = acc / row[i]
    sse = s[q * size + q]  # Σy² − 2 coef·b + coef·A·coef, with A without the ridge
    for i in range(q):
        ci = coef[i]
        sse -= 2.0 * ci * s[i * size + q]
        for j in range(q):
            sse += ci * coef[j] * s[i * size + j]
    return coef, math.sqrt(max(sse, 0.0) / max(n - k - 1, 1.0))


def solve_moments_many(s: np.ndarray, size: int, scales_sq: list[float], ridge: float
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``solve_moments`` for each row of a (systems × size²) matrix, numpy across the systems.

    Returns (coefficients, sigmas, solved): row i's result is ``(coefficients[i].tolist(), sigmas[i])`` where
    ``solved[i]``, None otherwise (too few samples, singular). The elimination is ``solve_moments``'s, operation for
    operation and with the same pivots, so the floats are the same. Rows must be finite: ``solve_moments``'s pivot
    search treats a NaN its own way, so such rows go through it instead.
    """
    k = size - 2
    q = k + 1
    count = len(s)
    n = s[:, 0]
    solved = n >= k + 3
    a = s.reshape(count, size, size)[:, :q, :].copy()
    for i in range(1, q):
        a[:, i, i] = a[:, i, i] + ridge * n * scales_sq[i - 1]
    every = np.arange(count)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for col in range(q):
            pivot = col + np.argmax(np.abs(a[:, col:, col]), axis=1)  # the first largest, as the strict > scan
            solved &= np.abs(a[every, pivot, col]) != 0.0
            swap = every[pivot != col]
            if len(swap):
                held = a[swap, col].copy()
                a[swap, col] = a[swap, pivot[swap]]
                a[swap, pivot[swap]] = held
            top = a[:, col]
            for r in range(col + 1, q):
                f = a[:, r, col] / top[:, col]
                nonzero = f != 0
                for j in range(col + 1, size):
                    a[:, r, j] = np.where(nonzero, a[:, r, j] - f * top[:, j], a[:, r, j])
        coef = np.zeros((count, q))
        for i in range(q - 1, -1, -1):
            acc = a[:, i, q]
            for j in range(i + 1, q):
                acc = acc - a[:, i, j] * coef[:, j]
            coef[:, i] = acc / a[:, i, i]
        sse = s[:, q * size + q]
        for i in range(q):
            ci = coef[:, i]
            sse = sse - 2.0 * ci * s[:, i * size + q]
            for j in range(q):
                sse = sse + ci * coef[:, j] * s[:, i * size + j]
        dof = n - k - 1
        sigma = np.sqrt(np.where(0.0 > sse, 0.0, sse) / np.where(1.0 > dof, 1.0, dof))  # Python's max()s
    return coef, sigma, solved


@dataclass(frozen=True)
class Forecast:
    """Hours until the level crosses the failure threshold: expected and a 95 % range (None = not heading there)."""

    expected: float | None
    earliest: float | None
    latest: float | None


def forecast(trend: Trend, threshold: float, direction: str) -> Forecast:
    """Time to ``threshold`` from a trend; ``direction`` "falling" fails below it, "rising" above it."""
    sign = -1.0 if direction == "falling" else 1.0
    gap = sign * (threshold - trend.level)  # > 0 while the threshold is still ahead
    if gap <= 0:
        return Forecast(0.0, 0.0, 0.0)
    rate = sign * trend.slope  # > 0 when heading toward the threshold
    fastest = max(sign * trend.slope_lo, sign * trend.slope_hi)
    slowest = min(sign * trend.slope_lo, sign * trend.slope_hi)
    return Forecast(expected=gap / rate if rate > 0 else None,
                    earliest=gap / fastest if fastest > 0 else None,
                    latest=gap / slowest if slowest > 0 else None)


def hours_to_threshold(trend: Trend, threshold: float, direction: str) -> tuple[float | None, float | None]:
    """(expected, earliest plausible) hours until the level crosses ``threshold``; None if not heading there."""
    f = forecast(trend, threshold, direction)
    return f.expected, f.earliest


def health(level: float, nominal: float, failure: float) -> float:
    """1 at the nominal level, 0 at the failure threshold, clipped to [0, 1]."""
    span = nominal - failure
    if span == 0:
        return 0.0
    return float(min(1.0, max(0.0, (level - failure) / span)))

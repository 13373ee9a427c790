"""Trend maths against cases with known answers: slopes, change points, normalisation, forecasts."""

from __future__ import annotations

import numpy as np
import pytest

from trends.maths import (
    Trend,
    cusum_alarm,
    fit_growth,
    fit_trend,
    forecast,
    growth_forecast,
    health,
    moments,
    robust_scale,
    solve_moments,
)


def test_theil_sen_recovers_the_slope_of_a_noisy_line_within_its_interval() -> None:
    rng = np.random.default_rng(1)
    t = np.arange(72, dtype=float)
    y = 320.0 - 0.8 * t + rng.normal(0, 3.0, t.size)
    trend = fit_trend(t, y)
    assert trend is not None
    assert trend.slope == pytest.approx(-0.8, abs=0.05)
    assert trend.slope_lo < -0.8 < trend.slope_hi
    assert trend.level == pytest.approx(320.0 - 0.8 * 71, abs=3.0)


def test_theil_sen_ignores_a_few_wild_windows() -> None:
    t = np.arange(40, dtype=float)
    y = 100.0 + 0.5 * t
    y[[5, 17, 30]] = [900.0, -500.0, 1e4]  # spikes a sensor can produce
    trend = fit_trend(t, y)
    assert trend is not None
    assert trend.slope == pytest.approx(0.5, abs=0.01)


def test_flat_noise_gives_an_interval_that_contains_zero() -> None:
    rng = np.random.default_rng(2)
    t = np.arange(48, dtype=float)
    trend = fit_trend(t, 13.9 + rng.normal(0, 0.05, t.size))
    assert trend is not None and trend.slope_lo < 0 < trend.slope_hi


def test_too_few_points_give_no_trend() -> None:
    assert fit_trend(np.array([0.0, 1.0]), np.array([1.0, 2.0])) is None
    assert fit_trend(np.array([3.0, 3.0, 3.0]), np.array([1.0, 2.0, 3.0])) is None


def test_cusum_finds_a_step_at_its_known_time_and_ignores_one_spike() -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(0, 1, 200)
    z[60] = 40.0  # one spike: clipped, no alarm
    assert cusum_alarm(z[:120], k=1.0, h=10.0) is None
    z[120:] += 4.0  # a level shift of four standard deviations at index 120
    alarm = cusum_alarm(z, k=1.0, h=10.0)
    assert alarm is not None and 120 <= alarm <= 126


def test_normalisation_removes_a_known_operating_effect() -> None:
    rng = np.random.default_rng(4)
    rpm = rng.uniform(1500, 2200, 2000)
    oil_t = rng.uniform(80, 110, 2000)
    # value at the reference point (1800 rpm, 95 °C) is 300; +0.2 per rpm, −1.5 per °C
    y = 300.0 + 0.2 * (rpm - 1800) - 1.5 * (oil_t - 95) + rng.normal(0, 2.0, 2000)
    x = np.column_stack([rpm - 1800, oil_t - 95])
    fit = solve_moments(moments(x, y).ravel().tolist(), 4, [1800.0**2, 95.0**2], 1e-6)
    assert fit is not None
    (intercept, *beta), sigma = fit
    assert intercept == pytest.approx(300.0, abs=0.3)
    assert beta == pytest.approx([0.2, -1.5], abs=0.01)
    assert sigma == pytest.approx(2.0, rel=0.1)
    normalised = y - x @ np.asarray(beta)
    assert normalised.std() < 2.2 < y.std() / 10  # the operating effect is gone, only noise is left


def test_a_covariate_that_never_moves_gets_no_weight() -> None:
    rng = np.random.default_rng(5)
    y = 50.0 + rng.normal(0, 1.0, 500)
    x = np.full((500, 1), 10.0)  # always 10 above its reference: collinear with the intercept
    fit = solve_moments(moments(x, y).ravel().tolist(), 3, [60.0**2], 4e-4)
    assert fit is not None and abs(fit[0][1]) < 0.1


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_the_per_window_solve_matches_lapack(k: int) -> None:
    rng = np.random.default_rng(10 + k)
    for _ in range(20):
        n = int(rng.integers(k + 3, 400))
        x = rng.normal(0, rng.uniform(0.1, 50, k), (n, k))
        y = 10.0 + x @ rng.normal(0, 2, k) + rng.normal(0, 1, n)
        m = moments(x, y)
        scales = rng.uniform(1, 100, k)
        a = m[: k + 1, : k + 1].copy()
        a[np.arange(1, k + 1), np.arange(1, k + 1)] += 1e-3 * n * scales**2
        ref = np.linalg.solve(a, m[: k + 1, k + 1])
        got = solve_moments(m.ravel().tolist(), k + 2, (scales**2).tolist(), 1e-3)
        assert got is not None
        assert got[0] == pytest.approx(ref.tolist(), rel=1e-9, abs=1e-9)
        resid = y - ref[0] - x @ ref[1:]
        assert got[1] == pytest.approx(np.sqrt(resid @ resid / max(n - k - 1, 1)), rel=1e-3)


def test_the_per_window_solve_refuses_too_few_samples_and_a_singular_system() -> None:
    m = moments(np.zeros((10, 1)), np.arange(10.0))  # the covariate never moves and there is no ridge
    assert solve_moments(m.ravel().tolist(), 3, [1.0], 0.0) is None
    assert solve_moments(moments(np.ones((3, 1)), np.ones(3)).ravel().tolist(), 3, [1.0], 1e-3) is None


def test_forecast_time_to_threshold_with_its_range() -> None:
    trend = Trend(level=200.0, slope=-1.0, slope_lo=-1.25, slope_hi=-0.8, n=30)
    fc = forecast(trend, 150.0, "falling")
    assert fc.expected == pytest.approx(50.0)
    assert fc.earliest == pytest.approx(40.0)
    assert fc.latest == pytest.approx(62.5)
    assert forecast(trend, 150.0, "rising").expected == 0.0  # "rising" part already beyond 150
    flat = Trend(level=200.0, slope=0.1, slope_lo=-0.1, slope_hi=0.3, n=30)
    assert forecast(flat, 150.0, "falling").expected is None


def test_health_and_robust_scale() -> None:
    assert health(320.0, 320.0, 150.0) == 1.0
    assert health(235.0, 320.0, 150.0) == pytest.approx(0.5)
    assert health(100.0, 320.0, 150.0) == 0.0
    assert robust_scale(np.array([1.0, 1.0, 1.0, 1.0, 100.0])) == 0.0


def test_growth_fit_recovers_a_known_exponential_rate_and_forecasts_its_failure() -> None:
    rng = np.random.default_rng(3)
    t = np.arange(0.0, 7 * 24, 24.0)  # seven daily points
    rate = 0.01  # per hour: progress grows e-fold every 100 h and reaches 1 at t = 240 h
    progress = np.exp(rate * (t - 240.0)) * (1 + rng.normal(0, 0.01, t.size))
    growth = fit_growth(t, progress)
    assert growth is not None
    assert growth.slope == pytest.approx(rate, rel=0.1)
    assert growth.slope_lo > 0
    fc = growth_forecast(growth)
    assert fc.expected == pytest.approx(240.0 - t[-1], rel=0.15)
    assert fc.earliest is not None and fc.earliest <= fc.expected
    # A straight line through the same points sees the failure later: that is what the growth fit is for.
    line = fit_trend(t, progress)
    assert line is not None
    assert forecast(line, 1.0, "rising").expected > fc.expected


def test_growth_fit_ignores_points_near_zero_and_needs_three() -> None:
    t = np.arange(5, dtype=float)
    assert fit_growth(t, np.array([0.0, 0.01, -0.02, 0.3, 0.4])) is None  # two points above the floor
    flat = fit_growth(np.arange(8, dtype=float), np.full(8, 0.4) + np.tile([0.01, -0.01], 4))
    assert flat is not None and flat.slope_lo < 0 < flat.slope_hi  # no growth: the interval straddles zero


def test_fitting_many_series_at_once_gives_each_series_own_fit() -> None:
    from trends.maths import fit_trends

    rng = np.random.default_rng(5)
    for n in (2, 3, 5, 6, 7, 8, 17, 24, 48):
        t = np.round(np.sort(rng.uniform(0, 500, (12, n)), axis=1), 4)
        y = 300 + rng.normal(0, 2, (12, n)) + 0.3 * t
        t[1, 1] = t[1, 0]  # two windows at one time
        y[2] = 320.0  # flat: zero robust scale
        y[3, n // 2] = np.nan
        t[4] = 7.0  # every point at one time: no fit
        y[5] = 300 + 10 * np.sin(t[5] / 60)  # residuals that wander together (the interval widens)
        want = [fit_trend(t[r], y[r]) for r in range(12)]
        assert repr(fit_trends(t, y)) == repr(want)  # repr: NaN compares equal to NaN, -0.0 differs from 0.0
        if n >= 3:
            assert sum(f is not None for f in want) >= 8


def test_solving_many_regressions_at_once_gives_each_system_own_solution() -> None:
    from trends.maths import solve_moments, solve_moments_many

    rng = np.random.default_rng(1)
    for size in (2, 3, 4, 5):
        k = size - 2
        systems = np.zeros((300, size * size))
        for r in range(len(systems)):
            n = int(rng.integers(1, 200))
            x = rng.normal(0, rng.choice([1e-6, 1, 100]), (n, k)) * rng.choice([0, 1], k)  # some never vary
            z = np.column_stack([np.ones(n), x, 3 + (x * rng.normal(size=k)).sum(axis=1) + rng.normal(0, 1, n)])
            systems[r] = (z.T @ z).ravel() * rng.choice([1.0, 0.9])  # 0.9: moments of decayed samples
        systems[::17] = 0.0  # nothing learnt yet
        systems[5::23, 0] = 2.0  # too few samples
        scales = [float(v) for v in rng.uniform(1, 100, k)]
        coef, sigma, solved = solve_moments_many(systems, size, scales, 1e-5)
        got = [(coef[r].tolist(), float(sigma[r])) if solved[r] else None for r in range(len(systems))]
        want = [solve_moments(row, size, scales, 1e-5) for row in systems.tolist()]
        assert repr(got) == repr(want)
        assert 0 < sum(w is None for w in want) < len(want) // 4

"""Scenarios: which tractors wear which part, and how fast."""

from __future__ import annotations

from datetime import datetime

from simulators.fleet import DAY, NOMINALS, Fleet, Wear

# failure values per signal, matching the shipped catalog's failure thresholds
FAILURE_VALUES = {"oil_pressure_kpa": 150.0}
PART_OF_SIGNAL = {"oil_pressure_kpa": "OIL-PUMP"}

SCENARIOS = ("oil-pump-demo", "healthy")


class ScenarioError(ValueError):
    """An unknown scenario or impossible parameters."""


def build(name: str, tractors: int, days: float, seed: int, start: datetime,
          degrading: int = 1) -> Fleet:
    """A fleet for scenario ``name``.

    ``oil-pump-demo``: the first ``degrading`` tractors' oil pumps wear linearly from day 1 and would fail
    one day after the run ends; every other tractor stays healthy with sensor noise.
    ``healthy``: nobody wears.
    """
    if name not in SCENARIOS:
        raise ScenarioError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")
    if tractors < 1 or days <= 1:
        raise ScenarioError("need at least one tractor and more than one day")
    wear: list[Wear] = []
    if name == "oil-pump-demo":
        if not 0 <= degrading <= tractors:
            raise ScenarioError("degrading must be between 0 and the number of tractors")
        sig = "oil_pressure_kpa"
        wear = [Wear(i, PART_OF_SIGNAL[sig], sig, "linear", onset_s=1 * DAY, failure_s=(days + 1) * DAY,
                     nominal=NOMINALS[sig][0], failure_value=FAILURE_VALUES[sig]) for i in range(degrading)]
    return Fleet(tractors, seed, wear, start)

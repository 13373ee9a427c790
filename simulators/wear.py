"""Injected part wear: how far a part has worn at a time, for linear, accelerating and sudden-onset wear."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WEAR_KINDS = ("linear", "exponential", "sudden")
EXP_RATE = 4.0  # curvature of accelerating wear: w = (e^{kx} - 1) / (e^k - 1)
SUDDEN_JUMP = 0.7  # sudden-onset wear jumps 70 % of the way to failure within an hour of its onset
SUDDEN_RAMP_S = 3_600.0
MAX_WEAR = 1.3  # past its failure time a part keeps degrading at its final rate, up to this fraction


@dataclass(frozen=True)
class Wear:
    """Degradation of one part on one tractor (times in seconds from the simulation start)."""

    tractor_index: int
    part_id: str
    signal: str
    kind: str
    onset_s: float
    failure_s: float

    def fraction(self, t: float) -> float:
        """How far the part has worn at ``t``: 0 before the onset, exactly 1 at the failure time."""
        return float(wear_fraction(self.kind, np.asarray([t]), self.onset_s, self.failure_s)[0])


def wear_fraction(kind: str, t: np.ndarray, onset_s: float | np.ndarray,
                  failure_s: float | np.ndarray) -> np.ndarray:
    """Wear fraction of ``kind`` at times ``t`` (vectorised; onsets and failure times may be arrays too)."""
    span = np.asarray(failure_s, dtype=np.float64) - onset_s
    x = (np.asarray(t, dtype=np.float64) - onset_s) / span
    if kind == "linear":
        w = x
        rate_at_failure = 1.0
    elif kind == "exponential":
        w = np.expm1(EXP_RATE * np.minimum(x, 1.0)) / np.expm1(EXP_RATE)
        rate_at_failure = EXP_RATE * np.exp(EXP_RATE) / np.expm1(EXP_RATE)
    elif kind == "sudden":
        ramp = np.minimum(SUDDEN_RAMP_S / span, 0.5)
        w = np.where(x < ramp, SUDDEN_JUMP * x / ramp, SUDDEN_JUMP + (1 - SUDDEN_JUMP) * (x - ramp) / (1 - ramp))
        rate_at_failure = (1 - SUDDEN_JUMP) / (1 - ramp)
    else:
        raise ValueError(f"unknown wear kind {kind!r}; choose one of {', '.join(WEAR_KINDS)}")
    w = np.where(x > 1.0, 1.0 + (x - 1.0) * rate_at_failure, w)
    return np.clip(np.where(x <= 0.0, 0.0, w), 0.0, MAX_WEAR)

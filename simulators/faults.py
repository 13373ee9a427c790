"""Sensor faults that are not wear (the backend must not order parts for them), applied to a step's readings."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simulators.model import HIGH, SIGNAL_INDEX

# "out_of_range" is a deliberately invalid reading (outside the contract's plausible range): the ingest
# bridge must reject the sample, so it is labelled ``invalid`` in the ground truth.
FAULT_KINDS = ("spike", "stuck", "dropout", "offset", "noise", "out_of_range")
VALID_FAULT_KINDS = FAULT_KINDS[:-1]


@dataclass
class Fault:
    """One sensor fault on one tractor's signal, active for ``start_s <= t <= end_s`` (simulated seconds).

    ``magnitude`` is in the signal's unit: the spike height, the offset step or the noise burst's std.
    """

    tractor_index: int
    signal: str
    kind: str
    start_s: float
    end_s: float
    magnitude: float = 0.0
    seed: int = 0
    affected: int = 0  # samples the fault actually distorted (0 when the engine was off all the while)
    _stuck_value: float | None = field(default=None, repr=False)
    _rng: np.random.Generator | None = field(default=None, repr=False)

    def active(self, t: float) -> bool:
        """True while the fault distorts the signal."""
        return self.start_s <= t <= self.end_s

    def apply(self, readings: np.ndarray, missing: np.ndarray, t: float) -> None:
        """Distort row ``tractor_index`` of ``readings`` (shape (n, 13)) in place; mark dropouts in ``missing``."""
        i, j = self.tractor_index, SIGNAL_INDEX[self.signal]
        if self.kind == "spike" or self.kind == "offset":
            readings[i, j] += self.magnitude
        elif self.kind == "stuck":
            if self._stuck_value is None:
                self._stuck_value = float(readings[i, j])
            readings[i, j] = self._stuck_value
        elif self.kind == "dropout":
            missing[i, j] = True
        elif self.kind == "noise":
            if self._rng is None:
                self._rng = np.random.default_rng([self.seed, 7, self.tractor_index, j])
            readings[i, j] += self._rng.normal(0.0, self.magnitude)
        elif self.kind == "out_of_range":
            readings[i, j] = HIGH[j] * 1.5 + 1.0
        else:
            raise ValueError(f"unknown fault kind {self.kind!r}")


class FaultSet:
    """All faults of a run, indexed by time so each step touches only the active ones."""

    def __init__(self, faults: list[Fault]) -> None:
        self.faults = sorted(faults, key=lambda f: (f.start_s, f.tractor_index, f.signal))
        self._next = 0
        self._active: list[Fault] = []

    def apply(self, readings: np.ndarray, missing: np.ndarray, running: np.ndarray, t: float) -> np.ndarray | None:
        """Apply the faults active at ``t``; returns the mask of deliberately invalid cells (None if none)."""
        while self._next < len(self.faults) and self.faults[self._next].start_s <= t:
            self._active.append(self.faults[self._next])
            self._next += 1
        invalid: np.ndarray | None = None
        still: list[Fault] = []
        for f in self._active:
            if t > f.end_s:
                continue
            still.append(f)
            if running[f.tractor_index]:
                f.apply(readings, missing, t)
                f.affected += 1
                if f.kind == "out_of_range":
                    if invalid is None:
                        invalid = np.zeros(readings.shape, dtype=bool)
                    invalid[f.tractor_index, SIGNAL_INDEX[f.signal]] = True
        self._active = still
        return invalid


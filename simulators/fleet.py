"""A vectorised tractor-fleet model: operating load, coupled sensor signals and injected wear."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from ingest.validate import format_ts

DAY = 86_400.0


@dataclass(frozen=True)
class Wear:
    """Injected degradation of one part on one tractor (times in seconds from the simulation start)."""

    tractor_index: int
    part_id: str
    signal: str
    kind: str  # "linear"
    onset_s: float
    failure_s: float
    nominal: float
    failure_value: float

    def fraction(self, t: float) -> float:
        """How far the part has worn: 0 before onset, 1 at the failure time."""
        if t <= self.onset_s:
            return 0.0
        return (t - self.onset_s) / (self.failure_s - self.onset_s)


# signal -> (nominal at reference operating point, noise std)
NOMINALS: dict[str, tuple[float, float]] = {
    "oil_pressure_kpa": (320.0, 6.0),
    "coolant_temp_c": (88.0, 1.0),
    "hydraulic_pressure_bar": (190.0, 3.0),
    "battery_v": (13.9, 0.08),
}


class Fleet:
    """N tractors whose readings at time t come from one numpy draw per signal."""

    def __init__(self, tractors: int, seed: int, wear: list[Wear], start: datetime) -> None:
        self.n = tractors
        self.ids = [f"T{i + 1:05d}" for i in range(tractors)]
        self.rng = np.random.default_rng(seed)
        self.wear = wear
        self.start = start
        self.engine_hours = self.rng.uniform(200, 3000, tractors)
        self.seq = np.zeros(tractors, dtype=np.int64)

    def sample(self, t: float, dt: float) -> dict[str, np.ndarray]:
        """Readings of every tractor at ``t`` seconds after the start (``dt`` since the previous sample)."""
        rng, n = self.rng, self.n
        rpm = np.clip(rng.normal(1800, 60, n), 700, 2400)
        load = np.clip(rng.normal(60, 8, n), 5, 100)
        self.engine_hours += dt / 3600.0
        out = {
            "engine_rpm": rpm,
            "engine_load_pct": load,
            # Oil pressure rises with engine speed (pump output), around its nominal at 1800 rpm.
            "oil_pressure_kpa": NOMINALS["oil_pressure_kpa"][0] * (rpm / 1800) ** 0.5,
            "coolant_temp_c": NOMINALS["coolant_temp_c"][0] + 0.05 * (load - 60),
            "hydraulic_pressure_bar": np.full(n, NOMINALS["hydraulic_pressure_bar"][0]),
            "battery_v": np.full(n, NOMINALS["battery_v"][0]),
            "fuel_rate_lph": 5 + 0.25 * load + rng.normal(0, 0.5, n),
        }
        for sig, (_, noise) in NOMINALS.items():
            out[sig] = out[sig] + rng.normal(0, noise, n)
        for w in self.wear:
            f = w.fraction(t)
            if f > 0:
                # The worn part delivers a fraction of its nominal output at the same operating point.
                healthy = out[w.signal][w.tractor_index]
                out[w.signal][w.tractor_index] = healthy + f * (w.failure_value - w.nominal)
        return out

    def messages(self, t: float, dt: float) -> list[tuple[str, dict[str, Any]]]:
        """One v1 payload per tractor for time ``t``."""
        readings = self.sample(t, dt)
        ts = format_ts(self.start + timedelta(seconds=t))
        names = list(readings)
        columns = [np.round(readings[s], 3).tolist() for s in names]
        hours = np.round(self.engine_hours, 3).tolist()
        self.seq += 1
        seqs = self.seq.tolist()
        return [
            (tid, {"v": 1, "tractor_id": tid, "seq": seqs[i],
                   "samples": [{"ts": ts, "engine_hours": hours[i],
                                "readings": {s: col[i] for s, col in zip(names, columns, strict=True)}}]})
            for i, tid in enumerate(self.ids)
        ]

    def truth(self, scenario: str, seed: int, days: float, period_s: float) -> dict[str, Any]:
        """Ground truth: what was injected, when it started and when the part fails."""
        return {
            "scenario": scenario,
            "seed": seed,
            "start": format_ts(self.start),
            "end": format_ts(self.start + timedelta(days=days)),
            "period_s": period_s,
            "tractors": self.ids,
            "wear": [
                {**{k: v for k, v in asdict(w).items() if k not in ("tractor_index",)},
                 "tractor_id": self.ids[w.tractor_index],
                 "onset": format_ts(self.start + timedelta(seconds=w.onset_s)),
                 "failure_time": format_ts(self.start + timedelta(seconds=w.failure_s))}
                for w in self.wear
            ],
            "faults": [],
        }


def start_for(days: float, now: datetime | None = None) -> datetime:
    """Simulation start so the accelerated run ends at about now (timestamps never lie in the future)."""
    now = now or datetime.now(UTC)
    return (now - timedelta(days=days)).replace(minute=0, second=0, microsecond=0)

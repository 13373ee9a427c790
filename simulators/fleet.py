"""A simulated fleet: the coupled model plus wear, sensor faults and network behaviour, as v1 MQTT payloads.

``Fleet.run`` steps the simulated clock and yields, per step, the messages that leave the tractors
(``(tractor_id, payload bytes)``); ``Fleet.truth`` is the ground truth of everything injected. The same
seed and scenario give the same messages and truth byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from ingest.validate import format_ts
from simulators.faults import Fault, FaultSet
from simulators.model import (
    DECIMALS,
    HIGH,
    LOW,
    OFF,
    REFERENCE,
    SIGNAL_ORDER,
    WEAR_SIGNALS,
    Climate,
    PartSpec,
    Schedule,
    TractorModel,
    parts_from_catalog,
)
from simulators.wear import Wear, wear_fraction

DAY = 86_400.0
MAX_SAMPLES_PER_MESSAGE = 500  # well under the bridge's payload limits (2000 samples, 256 KiB)

_SAMPLE_FMT = ('{"ts":"%s","engine_hours":%.3f,"readings":{'
               + ",".join(f'"{s}":%.{DECIMALS[s]}f' for s in SIGNAL_ORDER) + "}}")
_READING_FMT = [f'"{s}":%.{DECIMALS[s]}f' for s in SIGNAL_ORDER]


@dataclass
class Network:
    """How messages reach the broker: coverage gaps (store-and-forward), duplicates, reordering, clock skew."""

    gaps: list[tuple[int, float, float]] = field(default_factory=list)  # (tractor index, start s, end s)
    duplicate_probability: float = 0.0
    reorder_probability: float = 0.0
    clock_skew_s: dict[int, float] = field(default_factory=dict)  # tractor index -> seconds its clock is off
    samples_per_message: int = 1


class Fleet:
    """N tractors with injected wear, sensor faults and network behaviour, stepping on a simulated clock."""

    def __init__(self, tractors: int, seed: int, start: datetime, wear: list[Wear] | None = None,
                 faults: list[Fault] | None = None, network: Network | None = None,
                 parts: dict[str, PartSpec] | None = None, schedule: Schedule | None = None,
                 climate: Climate | None = None, scenario: str = "custom",
                 model_names: list[str] | None = None) -> None:
        self.n = tractors
        self.seed = seed
        self.start = start.astimezone(UTC)
        self.scenario = scenario
        self.ids = [f"T{i + 1:05d}" for i in range(tractors)]
        self.model_names = model_names or ["standard"] * tractors
        self.parts = parts or parts_from_catalog(None)
        self.wear = list(wear or [])
        self.faults = list(faults or [])
        self.network = network or Network()
        self.model = TractorModel(tractors, seed, self.start.timestamp(), self.parts, schedule, climate)
        # fresh copies carry the run's state (stuck value, noise generator, samples affected)
        self._applied = [Fault(f.tractor_index, f.signal, f.kind, f.start_s, f.end_s, f.magnitude, seed)
                         for f in self.faults]
        self._fault_set = FaultSet(self._applied)
        self._failure = {p.signal: p.failure for p in self.parts.values()}
        # Per signal and wear kind: tractor indices, onsets and failure times, for one vectorised pass per step.
        self._wear_groups: dict[str, list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]] = {}
        groups: dict[tuple[str, str], list[Wear]] = {}
        for w in self.wear:
            groups.setdefault((w.signal, w.kind), []).append(w)
        for (sig, kind), ws in sorted(groups.items()):
            self._wear_groups.setdefault(sig, []).append((
                kind, np.array([w.tractor_index for w in ws]), np.array([w.onset_s for w in ws], dtype=np.float64),
                np.array([w.failure_s for w in ws], dtype=np.float64)))
        self._net_rng = np.random.default_rng([seed, 6])
        self.seq = np.zeros(tractors, dtype=np.int64)
        self._pending: list[list[str]] = [[] for _ in range(tractors)]
        self._pending_n = np.zeros(tractors, dtype=np.int64)
        self._held: dict[int, bytes] = {}
        self._steps = 0
        self._phase = np.arange(tractors) % self.network.samples_per_message
        gaps: dict[int, list[tuple[float, float]]] = {}
        for i, a, b in sorted(self.network.gaps):
            gaps.setdefault(i, []).append((a, b))
        self._gaps = gaps
        self._gap_start = np.full(tractors, np.inf)
        self._gap_end = np.full(tractors, np.inf)
        self._gap_pos = dict.fromkeys(gaps, 0)
        for i, lst in gaps.items():
            self._gap_start[i], self._gap_end[i] = lst[0]
        self.duplicates: list[tuple[int, int]] = []
        self.reordered: list[tuple[int, int]] = []
        self.invalid_samples: list[tuple[int, float]] = []
        self.messages_sent = 0
        self.samples_sent = 0
        self.days = 0.0
        self.period_s = 0.0
        self.model_time = 0.0  # simulated seconds of the latest step
        self.last_readings = np.zeros((tractors, len(SIGNAL_ORDER)))  # the latest step's readings (after faults)

    # ------------------------------------------------------------------ wear
    def levels(self, t: float) -> dict[str, np.ndarray]:
        """Reference level of every wear signal per tractor at ``t``: healthy, or moved toward failure by wear."""
        out: dict[str, np.ndarray] = {}
        for sig in WEAR_SIGNALS:
            healthy = self.model.healthy_level(sig)
            groups = self._wear_groups.get(sig)
            if not groups:
                out[sig] = healthy
                continue
            level = np.array(healthy, dtype=np.float64, copy=True)
            fail = self._failure[sig]
            for kind, idx, onset, failure in groups:
                f = wear_fraction(kind, np.full(idx.shape, t), onset, failure)
                level[idx] = healthy[idx] + f * (fail - healthy[idx])
            out[sig] = level
        return out

    # ------------------------------------------------------------------ stepping
    def run(self, days: float, period_s: float) -> Iterator[tuple[float, list[tuple[str, bytes]]]]:
        """Step from the start to ``days`` every ``period_s`` seconds; yield (fraction done, messages)."""
        self.days, self.period_s = days, period_s
        steps = int(round(days * DAY / period_s))
        for step in range(1, steps + 1):
            t = step * period_s
            msgs = self.step(t, period_s)
            if step == steps:
                msgs += self.finish()
            yield step / steps, msgs

    def step(self, t: float, dt: float) -> list[tuple[str, bytes]]:
        """Advance to ``t`` and return the messages the tractors send at that moment."""
        readings = self.model.step(t, dt, self.levels(t))
        running = self.model.mode != OFF
        missing = np.zeros(readings.shape, dtype=bool)
        invalid = self._fault_set.apply(readings, missing, running, t)
        if invalid is None:
            readings = np.clip(readings, LOW, HIGH)
        else:
            readings = np.where(invalid, readings, np.clip(readings, LOW, HIGH))
            for i in np.flatnonzero(invalid.any(axis=1) & running).tolist():
                self.invalid_samples.append((i, t))
        self.model_time, self.last_readings = t, readings
        self._collect(t, readings, missing, running)
        return self._flush(t, running)

    def _collect(self, t: float, readings: np.ndarray, missing: np.ndarray, running: np.ndarray) -> None:
        idx = np.flatnonzero(running)
        if idx.size == 0:
            return
        ts_now = format_ts(self.start + timedelta(seconds=t))
        skew = self.network.clock_skew_s
        rows = readings[idx].tolist()
        hours = self.model.engine_hours[idx].tolist()
        order = idx.tolist()
        pending = self._pending
        # %-formatting with one precompiled template per sample: the hot path at 10,000 tractors × 1 Hz.
        samples = [_SAMPLE_FMT % (ts_now, h, *r) for h, r in zip(hours, rows, strict=True)]
        # the few tractors with a skewed clock or a dropped-out signal are redone one by one
        odd = set(np.flatnonzero(missing[idx].any(axis=1)).tolist())
        if skew:
            odd.update(k for k, i in enumerate(order) if i in skew)
        for k in sorted(odd):
            i = order[k]
            ts = format_ts(self.start + timedelta(seconds=t + skew[i])) if i in skew else ts_now
            keep = [_READING_FMT[j] % v for j, v in enumerate(rows[k]) if not missing[i, j]]
            samples[k] = '{"ts":"%s","engine_hours":%.3f,"readings":{%s}}' % (  # noqa: UP031
                ts, hours[k], ",".join(keep))
        for i, sample in zip(order, samples, strict=True):
            pending[i].append(sample)
        self._pending_n[idx] += 1

    def _in_gap(self, t: float) -> np.ndarray:
        ended = np.flatnonzero(t >= self._gap_end)
        for i in ended.tolist():
            lst = self._gaps[i]
            pos = self._gap_pos[i]
            while pos < len(lst) and t >= lst[pos][1]:
                pos += 1
            self._gap_pos[i] = pos
            self._gap_start[i], self._gap_end[i] = lst[pos] if pos < len(lst) else (np.inf, np.inf)
        return (t >= self._gap_start) & (t < self._gap_end)

    def _flush(self, t: float, running: np.ndarray) -> list[tuple[str, bytes]]:
        k = self.network.samples_per_message
        self._steps += 1
        # Telematics units are not synchronised: tractor i sends on the steps where (step + i) % k == 0, so
        # each step carries about n/k messages instead of all n every k-th step.
        on_turn = (self._steps + self._phase) % k == 0
        due = (self._pending_n > 0) & ~self._in_gap(t) & (on_turn | (self._pending_n >= k) | ~running)
        out: list[tuple[str, bytes]] = []
        for i in np.flatnonzero(due).tolist():
            self._send(i, out)
        return out

    def _send(self, i: int, out: list[tuple[str, bytes]]) -> None:
        samples = self._pending[i]
        self._pending[i] = []
        self._pending_n[i] = 0
        tid = self.ids[i]
        net, rng = self.network, self._net_rng
        for a in range(0, len(samples), MAX_SAMPLES_PER_MESSAGE):
            chunk = samples[a:a + MAX_SAMPLES_PER_MESSAGE]
            self.seq[i] += 1
            seq = int(self.seq[i])
            payload = ('{"v":1,"tractor_id":"%s","seq":%d,"samples":[%s]}'  # noqa: UP031 (hot path)
                       % (tid, seq, ",".join(chunk))).encode()
            self.samples_sent += len(chunk)
            held = self._held.pop(i, None)
            if net.reorder_probability and held is None and rng.random() < net.reorder_probability:
                self._held[i] = payload  # overtaken by this tractor's next message
                self.reordered.append((i, seq))
                continue
            out.append((tid, payload))
            self.messages_sent += 1
            if held is not None:
                out.append((tid, held))
                self.messages_sent += 1
            if net.duplicate_probability and rng.random() < net.duplicate_probability:
                out.append((tid, payload))
                self.messages_sent += 1
                self.duplicates.append((i, seq))

    def finish(self) -> list[tuple[str, bytes]]:
        """Send whatever is still buffered (the run ends; coverage comes back)."""
        out: list[tuple[str, bytes]] = []
        for i in np.flatnonzero(self._pending_n > 0).tolist():
            self._send(i, out)
        for i, payload in sorted(self._held.items()):
            out.append((self.ids[i], payload))
            self.messages_sent += 1
        self._held.clear()
        return out

    # ------------------------------------------------------------------ ground truth
    def _iso(self, seconds: float) -> str:
        return format_ts(self.start + timedelta(seconds=seconds))

    def truth(self) -> dict[str, Any]:
        """Ground truth: wear with onset and failure time, sensor faults, network effects, run parameters."""
        ids = self.ids
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            "start": format_ts(self.start),
            "end": self._iso(self.days * DAY),
            "period_s": self.period_s,
            "samples_per_message": self.network.samples_per_message,
            "reference": REFERENCE,
            "tractors": ids,
            "tractor_models": dict(zip(ids, self.model_names, strict=True)),
            "wear": [
                {"tractor_id": ids[w.tractor_index], "part_id": w.part_id, "signal": w.signal, "kind": w.kind,
                 "onset": self._iso(w.onset_s), "failure_time": self._iso(w.failure_s),
                 "direction": self.parts[w.part_id].direction, "nominal": self.parts[w.part_id].nominal,
                 "failure_threshold": self.parts[w.part_id].failure}
                for w in self.wear
            ],
            "faults": [
                {"tractor_id": ids[f.tractor_index], "signal": f.signal, "kind": f.kind,
                 "start": self._iso(f.start_s), "end": self._iso(f.end_s), "magnitude": round(f.magnitude, 4),
                 "invalid": f.kind == "out_of_range", "samples_affected": f.affected}
                for f in self._applied
            ],
            "network": {
                "gaps": [{"tractor_id": ids[i], "start": self._iso(a), "end": self._iso(b)}
                         for i, a, b in sorted(self.network.gaps)],
                "clock_skew": [{"tractor_id": ids[i], "skew_s": s}
                               for i, s in sorted(self.network.clock_skew_s.items())],
                "duplicates": [{"tractor_id": ids[i], "seq": s} for i, s in self.duplicates],
                "reordered": [{"tractor_id": ids[i], "seq": s} for i, s in self.reordered],
            },
            "invalid_samples": [{"tractor_id": ids[i], "ts": self._iso(t + self.network.clock_skew_s.get(i, 0.0))}
                                for i, t in self.invalid_samples],
            "messages": self.messages_sent,
            "samples": self.samples_sent,
        }


def start_for(days: float, now: datetime | None = None) -> datetime:
    """Simulation start so the accelerated run ends at about now (timestamps never lie in the future)."""
    now = now or datetime.now(UTC)
    return (now - timedelta(days=days)).replace(minute=0, second=0, microsecond=0)

"""Detection-quality iteration loop: record the normalised window stream once, then replay only the trend logic.

Tuning the trend and alert rules (``Detector._update_trend`` / ``_assess``) does not change what the windows
normalise to, so the expensive part of a replay (simulation, JSON, flatten, windows, normalisation) is done
once and cached; each evaluation then re-runs only the trend + alert code over the cached per-(tractor, signal)
streams and scores the first alert per (tractor, part) like ``fleetwatch trends replay --memory`` does.

    python -m bench.quality record --tractors 500 --days 180          # once (slow: the whole pipeline)
    python -m bench.quality score [--all] [--set cusum_h=8 ...]       # seconds to a minute per look

``score`` replays the worn and sensor-faulted signals by default (every episode and every fault; healthy
signals of healthy tractors rarely alert); ``--all`` replays every stream for the exact false-order count.
It prints the evaluation table plus recall / on time broken down by wear kind and part, and false orders by
the fault kind (if any) on that tractor and signal. Cached streams are not generated data in the repository:
they live under ``.run/quality/`` (gitignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fleetwatch.db import CATALOG, load_catalog
from fleetwatch.settings import get_settings
from functions.config import load_functions
from simulators.scenario import build, load
from trends.detect import Detector, Outputs, Params, Part, flatten, new_state
from trends.evaluate import Order, evaluate, parse_ts

CACHE = Path(".run/quality")
WINDOW, FORGET, RELEARN, RELEARN_MORE = 0, 1, 2, 3  # stream row kinds


def catalog_parts() -> list[Part]:
    """Catalog parts as the detector sees them."""
    class Row:
        def __init__(self, d: dict[str, Any]) -> None:
            self.__dict__.update(d)
            self.extra = dict(d)

    return [Part.from_row(Row(r)) for r in load_catalog(CATALOG)]


def shipped_params(**overrides: Any) -> Params:
    """The detector params of fleetwatch/functions.toml, with overrides."""
    params = Params.from_context(load_functions(get_settings().functions_path)["trends-detect"].params)
    return dataclasses.replace(params, **overrides)


class _Recorder(Detector):
    """A detector that records each normalised window (and each forced re-learn) instead of trending it."""

    def __init__(self, parts: list[Part], params: Params) -> None:
        super().__init__(parts, params)
        self.streams: dict[tuple[str, str], list[tuple[float, float, float, int]]] = defaultdict(list)

    def _update_trend(self, tid: str, st: dict[str, Any], cs: dict[str, Any], ch: Any, t_h: float, norm: float,
                      w: int, flags: list[str], r: dict[str, Any], out: Outputs) -> None:
        self.streams[(tid, ch.signal)].append((t_h, norm, float(w), WINDOW))

    def _relearn(self, tid: str, st: dict[str, Any], cs: dict[str, Any], ch: Any, vals: list[tuple[float, float]],
                 w: int, r: dict[str, Any], out: Outputs) -> None:
        for k, (t_h, v) in enumerate(vals):
            self.streams[(tid, ch.signal)].append((t_h, v, float(w), RELEARN if k == 0 else RELEARN_MORE))

    def _change(self, cs: dict[str, Any], keep: int) -> None:
        sig = cs.get("_sig")
        if sig is not None and keep == 0:
            self.streams[sig].append((0.0, 0.0, 0.0, FORGET))
        super()._change(cs, keep)


def record(tractors: int, days: float, seed: int, batch: int, partitions: int) -> Path:
    """Run the whole pipeline once and cache the normalised window streams plus the ground truth."""
    catalog = load_catalog(CATALOG)
    fleet, run_days, period = build(load("mixed-wear"), tractors=tractors, days=days, seed=seed, catalog=catalog)
    det = _Recorder(catalog_parts(), shipped_params())
    states: dict[str, Any] = {}
    parts_state: dict[str, Any] = {}
    pending: list[tuple[str, bytes]] = []
    began = time.perf_counter()

    def flush() -> None:
        records = [{"topic": "telemetry", "partition": zlib.crc32(t.encode()) % partitions, "json": json.loads(p)}
                   for t, p in pending]
        pending.clear()
        frame = flatten(records)
        for tid in frame["tractor_id"].unique().tolist():
            st = states.setdefault(tid, new_state())
            for sig in det.channels:  # tag each channel state so a forced re-learn is recorded on its stream
                st["sig"].setdefault(sig, {"S": None, "beta": None, "sigma": 0.0, "level": None, "hist": [],
                                           "base": None, "trend": None, "cp": 0.0, "cn": 0.0, "rej": 0,
                                           "since": 0, "refit": 0, "_sig": (tid, sig)})
        det.process(frame, states, parts_state, states.get)

    for frac, msgs in fleet.run(run_days, period):
        pending.extend(msgs)
        if len(pending) >= batch:
            flush()
            print(f"\r{100 * frac:5.1f} % {time.perf_counter() - began:6.0f}s", end="", flush=True)
    if pending:
        flush()
    path = CACHE / f"mixed-wear-{tractors}x{days:g}-s{seed}.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    streams = {k: np.asarray(v, dtype=np.float64) for k, v in det.streams.items()}
    with path.open("wb") as fh:
        pickle.dump({"truth": fleet.truth(), "streams": streams, "catalog": catalog}, fh)
    print(f"\nrecorded {len(streams)} streams in {time.perf_counter() - began:.0f}s → {path}")
    return path


def replay(streams: dict[tuple[str, str], np.ndarray], params: Params) -> list[dict[str, Any]]:
    """The trend + alert logic over cached streams; the first alert per (tractor, part)."""
    det = Detector(catalog_parts(), params)
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for (tid, sig), arr in streams.items():
        ch = det.channels[sig]
        st = new_state()
        cs = {"S": None, "beta": None, "sigma": 0.0, "level": None, "hist": [], "base": None, "trend": None,
              "cp": 0.0, "cn": 0.0, "rej": 0, "since": 0, "refit": 0}
        st["sig"][sig] = cs
        out = Outputs()
        rows = arr.tolist()
        i = 0
        while i < len(rows):
            t_h, norm, w, kind = rows[i]
            i += 1
            if kind == FORGET:
                det._change(cs, keep=0)
            elif kind == RELEARN:
                vals = [(t_h, norm)]
                while i < len(rows) and rows[i][3] == RELEARN_MORE:
                    vals.append((rows[i][0], rows[i][1]))
                    i += 1
                det._relearn(tid, st, cs, ch, vals, int(w), {}, out)
            else:
                det._update_trend(tid, st, cs, ch, t_h, norm, int(w), [], {}, out)
        for a in out.alerts:
            first.setdefault((a["tractor_id"], a["part_id"]), a)
    return list(first.values())


def _fault_index(truth: dict[str, Any]) -> dict[tuple[str, str], list[str]]:
    idx: dict[tuple[str, str], list[str]] = defaultdict(list)
    for f in truth.get("faults", []):
        idx[(f["tractor_id"], f["signal"])].append(f["kind"])
    return idx


def score(path: Path, params: Params, every: bool) -> dict[str, Any]:
    """Replay the cached streams under ``params`` and print the evaluation with its breakdowns."""
    with path.open("rb") as fh:
        doc = pickle.load(fh)
    truth, streams, catalog = doc["truth"], doc["streams"], doc["catalog"]
    faults = _fault_index(truth)
    wanted = {(w["tractor_id"], w["signal"]) for w in truth["wear"]} | set(faults)
    chosen = streams if every else {k: v for k, v in streams.items() if k in wanted}
    began = time.perf_counter()
    alerts = replay(chosen, params)
    took = time.perf_counter() - began
    orders = [Order(a["tractor_id"], a["part_id"], ts) for a in alerts if (ts := parse_ts(a["detected_at"]))]
    lead = {str(r["part_id"]): float(r["lead_time_h"]) for r in catalog}
    report = evaluate(truth, orders, lead)
    print(f"replayed {len(chosen)} of {len(streams)} streams in {took:.1f}s ({'all' if every else 'worn+faulted'})")
    for k, v in report.rows():
        print(f"  {k:<55} {v}")
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    by_part: dict[str, Counter[str]] = defaultdict(Counter)
    for e in report.episodes:
        for table, key in ((by_kind, e.kind), (by_part, e.part_id)):
            c = table[key]
            c["n"] += 1
            c["ordered"] += e.order is not None
            c["on_time"] += e.on_time
            c["feasible"] += e.feasible
            c["on_time_feasible"] += e.on_time and e.feasible
            c["late_feasible"] += e.feasible and not e.on_time
    for name, table in (("kind", by_kind), ("part", by_part)):
        print(f"  by {name}: " + " · ".join(
            f"{k} {c['ordered']}/{c['n']} ordered, {c['on_time']} on time, feasible {c['on_time_feasible']}"
            f"/{c['feasible']}" for k, c in sorted(table.items())))
    signal_of = {str(r["part_id"]): str(r["signal"]) for r in catalog}
    why = Counter()
    for o in report.false_orders:
        kinds = faults.get((o.tractor_id, signal_of[o.part_id]), [])
        why[f"{o.part_id}:{'+'.join(sorted(kinds)) or 'no fault on signal'}"] += 1
    print("  false orders by part:fault kind: " + (", ".join(f"{k} ×{n}" for k, n in why.most_common()) or "none"))
    misses = [e for e in report.episodes if (e.feasible and not e.on_time) or e.order is None]
    for e in misses:
        lead = f"{e.lead_days:.1f} d" if e.lead_days is not None else "never"
        print(f"    late/missed: {e.tractor_id} {e.part_id:<12} {e.kind:<11} onset→failure "
              f"{(e.failure - e.onset).total_seconds() / 86400:5.1f} d, ordered {lead} before (lead "
              f"{e.lead_time_h / 24:.1f} d)")
    why_alert = {(a["tractor_id"], a["part_id"]): a for a in alerts}
    for o in report.false_orders:
        a = why_alert[(o.tractor_id, o.part_id)]
        ttf = f"{a['ttf_h']:.0f} h" if a["ttf_h"] is not None else "—"
        on_signal = faults.get((o.tractor_id, signal_of[o.part_id]), [])
        print(f"    false: {o.tractor_id} {o.part_id} at {o.detected_at:%Y-%m-%d %H:%M} ({a['reason']}, progress "
              f"{a['progress']:.2f}, ttf {ttf}) faults on signal: {on_signal}")
    return {"recall": report.recall, "on_time": report.on_time_rate, "on_time_feasible": report.on_time_feasible_rate,
            "false_per_1000": report.false_per_1000, "false": len(report.false_orders)}


def main() -> None:
    """Command line: ``record`` once, then ``score`` as often as needed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    sc = sub.add_parser("score")
    for p in (rec, sc):
        p.add_argument("--tractors", type=int, default=500)
        p.add_argument("--days", type=float, default=180)
        p.add_argument("--seed", type=int, default=7)
    rec.add_argument("--batch", type=int, default=2000)
    rec.add_argument("--partitions", type=int, default=4)
    sc.add_argument("--all", action="store_true", help="replay every stream (exact false-order count)")
    sc.add_argument("--set", nargs="*", default=[], help="param overrides, name=value")
    args = ap.parse_args()
    if args.cmd == "record":
        record(args.tractors, args.days, args.seed, args.batch, args.partitions)
        return
    overrides: dict[str, Any] = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        kind = type(getattr(Params(), k))
        overrides[k] = kind(float(v)) if kind is int else kind(v)
    path = CACHE / f"mixed-wear-{args.tractors}x{args.days:g}-s{args.seed}.pkl"
    score(path, shipped_params(**overrides), args.all)


if __name__ == "__main__":
    main()

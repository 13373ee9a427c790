"""The trend-detecting function: event-time windows per tractor × signal, normalised trends, wear alerts.

``handler`` is the function's entry point (database I/O around one batch); ``Detector`` is the pure
compute path (numpy across the whole batch, per-tractor state in plain dicts) that tests and the benchmark
drive in-process. docs/trends.md explains the maths and the tables.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from operator import itemgetter
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import ARRAY, DateTime, String, Table, any_, bindparam, insert, inspect, select, text, update
from sqlalchemy import column as sa_column
from sqlalchemy import table as sa_table
from sqlalchemy.orm import Session

from fleetwatch.settings import Settings
from functions.model import Context, json_values
from trends.maths import (
    Trend,
    cusum_step,
    fit_growth,
    fit_trend,
    fit_trends,
    forecast,
    growth_forecast,
    health,
    solve_moments,
    solve_moments_many,
)
from trends.tables import encode_state, part_health, trend_state, trend_windows

ALERT_TOPIC = "wear-alerts"
# Accumulator columns per (tractor, signal, window) before the moment matrix.
N, SUM, SUMSQ, LO, HI, N_USED, N_REJ, SUM_REJ = range(8)
BASE = 8


@dataclass(frozen=True)
class Part:
    """A catalog part as the detector needs it."""

    part_id: str
    signal: str
    direction: str
    nominal: float
    warning: float
    failure: float
    lead_time_h: float
    normalise_by: tuple[tuple[str, float], ...] = ()
    transform: str = "linear"
    band: tuple[tuple[str, float, float], ...] = ()
    relative_to: tuple[str, float] | None = None  # (condition, reference): compare value − condition + reference
    daily: str = "median"  # how a day's windows summarise: "median", or "min" for state-like signals (soot)

    @classmethod
    def from_row(cls, row: Any) -> Part:
        """A part from a ``parts`` row whose ``extra`` JSON holds the detector's keys."""
        extra = row.extra if isinstance(row.extra, dict) else json.loads(row.extra or "null") or {}
        norm = tuple((str(k), float(v)) for k, v in (extra.get("normalise_by") or {}).items())
        band = tuple((str(k), float(v[0]), float(v[1])) for k, v in (extra.get("band") or {}).items())
        rel = extra.get("relative_to")
        relative = (str(next(iter(rel))), float(next(iter(rel.values())))) if isinstance(rel, dict) and rel else None
        return cls(row.part_id, row.signal, row.direction, float(row.nominal), float(row.warning_threshold),
                   float(row.failure_threshold), float(row.lead_time_h), norm, str(extra.get("transform", "linear")),
                   band, relative, str(extra.get("daily", "median")))


@dataclass(frozen=True)
class Channel:
    """How one signal is normalised (from the parts that watch it) and which parts to assess on it."""

    signal: str
    covariates: tuple[str, ...]
    refs: np.ndarray
    log: bool
    band: tuple[tuple[str, float, float], ...]
    parts: tuple[Part, ...]
    relative_to: tuple[str, float] | None = None
    daily: str = "median"

    @property
    def k(self) -> int:
        """Number of covariates."""
        return len(self.covariates)

    def transform(self, value: float) -> float:
        """Signal units → regression space."""
        return math.log(max(value, 1e-9)) if self.log else value

    def untransform(self, value: float) -> float:
        """Regression space → signal units."""
        return math.exp(value) if self.log else value


def channels_for(parts: list[Part]) -> dict[str, Channel]:
    """One channel per wear signal; the first part naming a signal decides its normalisation."""
    by_signal: dict[str, list[Part]] = {}
    for p in parts:
        by_signal.setdefault(p.signal, []).append(p)
    out = {}
    for sig, ps in by_signal.items():
        first = ps[0]
        out[sig] = Channel(sig, tuple(c for c, _ in first.normalise_by),
                           np.array([r for _, r in first.normalise_by], dtype=np.float64), first.transform == "log",
                           first.band, tuple(ps), first.relative_to, first.daily)
    return out


@dataclass(frozen=True)
class Params:
    """Detector tuning, from the function's ``params`` table (fleetwatch/functions.toml)."""

    window_s: int = 3600
    lateness_s: int = 900
    idle_close_s: int = 6 * 3600  # close a quiet tractor's windows once its partition is this far ahead
    history: int = 24  # windows the window-level trend (change detection, held steps) is fitted over
    min_windows_after_change: int = 6  # windows needed after a change point before the window trend counts
    history_days: int = 14  # days the slope and forecast are fitted over
    recent_days: int = 5  # a second, short fit over the last days catches accelerating wear
    min_days: int = 6  # days needed before a slope counts
    confirm: int = 2  # consecutive window-trend fits that must show a held step before it alerts
    confirm_days: int = 2  # consecutive day-trend fits that must forecast failure before it alerts
    halflife_windows: float = 240.0  # memory of the operating-condition regression
    refit_windows: int = 4  # re-solve the regression and re-fit the window trend every so many windows
    min_samples: int = 60  # samples the condition regression needs before windows get a normalised value
    gate_sigmas: float = 8.0  # sample outlier gate, in residual standard deviations…
    gate_span: float = 0.35  # …but never tighter than this share of the nominal→failure span
    reject_run: int = 3  # windows of only-rejected samples, all on one side, that mean "the level moved"
    noisy_ratio: float = 3.0  # window residual std / usual std above which a window is a noise burst
    cusum_k: float = 1.0
    cusum_h: float = 10.0
    cusum_floor: float = 0.05  # CUSUM residual scale at least this share of the span (daily warm-up is no step)
    min_progress: float = 0.25  # share of the way from baseline to failure before any alert
    growth_days: int = 5  # days the accelerating-wear fit (log of progress) looks back over; < 3 turns it off
    growth_floor: float = 0.05  # progress below this is noise to the log fit (those days are left out)
    growth_progress: float = 0.2  # share of the way to failure before the growth fit may alert…
    growth_sigmas: float = 3.0  # …and at least this many day-trend residual scales (noisy signals wait longer)
    single_look_sigmas: float = 0.0  # one look (not confirm_days) suffices this many wanders out; 0 = off
    offset_share: float = 0.15  # a deviation under this share of nominal may be a calibration step: needs a slope
    step_progress: float = 0.5  # a level held this far toward failure alerts even without a slope
    lead_factor: float = 2.5
    max_extra_h: float = 120.0
    margin_h: float = 72.0
    realert_windows: int = 24
    max_seqs: int = 4096

    @classmethod
    def from_context(cls, params: dict[str, Any]) -> Params:
        """Params from a function's params, ignoring keys it does not know."""
        known = {k: v for k, v in params.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@lru_cache(maxsize=4096)
def _dt(epoch_s: float) -> datetime:
    """UTC datetime of an epoch second (cached: a fleet's windows share their bounds)."""
    return datetime.fromtimestamp(epoch_s, UTC)


@lru_cache(maxsize=4096)
def _hour(t_h: float) -> float:
    """A window's mid-time in hours as its trend history keeps it (rounded; cached: a close's windows share it)."""
    return round(t_h, 4)


def _pack(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.float64).tobytes()).decode()


def _unpack(s: str, width: int) -> np.ndarray:
    a = np.frombuffer(base64.b64decode(s), dtype=np.float64)
    return a.reshape(-1, width).copy() if width else a.copy()


def _remember(memo: dict[str, Any], key: str, value: Any) -> None:
    """Keep ``value`` under ``key`` in a memo of at most the state cache's size (oldest entries go first)."""
    memo.pop(key, None)
    memo[key] = value
    while len(memo) > max(STATE_CACHE_SIZE, 1):
        del memo[next(iter(memo))]


# ------------------------------------------------------------------------------------------ flatten
META = ("partition", "tractor_id", "seq", "ts")


def _reading_columns(blocks: dict[tuple[str, ...], tuple[list[int], list[list[Any]]]], n: int,
                     readings: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Signal columns (float64, NaN = absent) from blocks of samples sharing one set of signal names.

    A block (nearly always one) becomes a matrix through a single numpy conversion; a block holding a value
    numpy cannot read as a number goes through pandas' coercion instead (``readings`` are the samples' dicts).
    """
    columns: dict[str, np.ndarray] = {}
    for names, (rows, values) in blocks.items():
        if not names:
            continue
        arr: np.ndarray | None = None
        if len(set(names)) == len(names):
            try:
                arr = np.array(values)
            except (TypeError, ValueError):  # ragged or unreadable values
                arr = None
            if arr is not None and (arr.dtype.kind not in "biuf" or arr.ndim != 2):
                arr = None
        if arr is None:
            coerced = pd.DataFrame.from_records([readings[i] for i in rows]).apply(pd.to_numeric, errors="coerce")
            block_cols = {str(c): coerced[c].to_numpy(dtype=np.float64) for c in coerced.columns}
        else:
            arr = arr.astype(np.float64)
            block_cols = {name: arr[:, j] for j, name in enumerate(names)}
        idx = np.asarray(rows, dtype=np.int64)
        whole = len(rows) == n
        for name, col in block_cols.items():
            if whole and name not in columns:
                columns[name] = col
                continue
            target = columns.get(name)
            if target is None:
                target = columns[name] = np.full(n, np.nan)
            elif whole:
                target = columns[name] = target.copy()
            target[idx] = col
    return columns


def flatten(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per sample: partition, tractor_id, seq, ts (epoch s) and one column per signal (NaN = absent)."""
    part: list[str] = []
    tractor: list[str] = []
    seq: list[int] = []
    ts: list[Any] = []
    readings: list[dict[str, Any]] = []
    blocks: dict[tuple[str, ...], tuple[list[int], list[list[Any]]]] = {}
    labels: dict[tuple[Any, Any], str] = {}
    add_part, add_tractor, add_seq, add_ts, add_reading = (part.append, tractor.append, seq.append, ts.append,
                                                           readings.append)
    for r, msg in zip(records, json_values(records), strict=True):
        if type(msg) is not dict:
            continue
        samples = msg.get("samples")
        tid, s = msg.get("tractor_id"), msg.get("seq")
        if type(samples) is not list or not isinstance(tid, str) or not isinstance(s, int):
            continue
        # dict.get: the runtime's records hold topic and partition as plain entries (no lazy lookup needed).
        tp = (dict.get(r, "topic", ""), dict.get(r, "partition", 0))
        p = labels.get(tp)
        if p is None:
            p = labels[tp] = f"{tp[0]}-{tp[1]}"
        for sample in samples:
            if type(sample) is not dict:
                continue
            rd = sample.get("readings") or {}
            if type(rd) is not dict:
                continue
            add_part(p)
            add_tractor(tid)
            add_seq(s)
            add_ts(sample.get("ts", ""))
            block = blocks.get(names := tuple(rd))
            if block is None:
                block = blocks[names] = ([], [])
            block[0].append(len(readings))
            block[1].append(list(rd.values()))
            add_reading(rd)
    # Parse each distinct timestamp once (a fleet on synchronised clocks shares them).
    codes, uniq = pd.factorize(pd.Series(ts, dtype="object"), use_na_sentinel=False)
    parsed = pd.to_datetime(pd.Series(uniq, dtype="string"), utc=True, format="ISO8601", errors="coerce")
    epoch = parsed.dt.as_unit("ms").astype("int64").to_numpy() / 1e3
    epoch[epoch < -1e11] = np.nan  # NaT
    t = epoch[codes] if len(codes) else np.zeros(0)
    good = ~np.isnan(t)
    columns: dict[str, Any] = {"partition": np.asarray(part, dtype=object),
                               "tractor_id": np.asarray(tractor, dtype=object),
                               "seq": np.asarray(seq, dtype=np.int64), "ts": t}
    for name, col in _reading_columns(blocks, len(readings), readings).items():
        if name not in columns:
            columns[name] = col
    if not good.all():
        columns = {k: v[good] for k, v in columns.items()}
    return pd.DataFrame(columns, copy=False)


# ------------------------------------------------------------------------------------------ outputs
@dataclass
class Outputs:
    """What one batch produced: trend rows, latest part health, alerts and counters."""

    windows: list[dict[str, Any]] = field(default_factory=list)
    health: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)

    def count(self, name: str, value: float = 1) -> None:
        """Bump a counter."""
        self.counters[name] = self.counters.get(name, 0) + value


def new_state() -> dict[str, Any]:
    """Empty per-tractor state."""
    return {"wm": 0.0, "dd": None, "open": None, "sig": {}, "episodes": {}, "replaced": {}}


def _seen_state(hwm: int, bits: np.ndarray) -> list[Any]:
    """A tractor's dedupe state as stored: [highest seq seen, base64 of the packed bitmap] (read by ``_seen``)."""
    return [hwm, base64.b64encode(np.packbits(bits).tobytes()).decode()]


def _groups(values: np.ndarray) -> list[tuple[Any, np.ndarray]]:
    """(value, row indices) for each distinct value, in order of first appearance."""
    codes, uniq = pd.factorize(values)
    if not len(uniq):
        return []
    order = np.argsort(codes, kind="stable")
    bounds = np.cumsum(np.bincount(codes, minlength=len(uniq)))[:-1]
    return list(zip(uniq.tolist(), np.split(order, bounds), strict=True))


def _sort_order(keys: np.ndarray) -> np.ndarray:
    """Stable lexicographic order of integer key rows (what ``np.lexsort`` of the reversed columns gives)."""
    lo = keys.min(axis=0)
    span = keys.max(axis=0) - lo + 1
    if float(np.prod(span.astype(np.float64))) < 2.0 ** 62:  # one mixed-radix int64 key sorts faster than lexsort
        flat = np.zeros(len(keys), dtype=np.int64)
        for j in range(keys.shape[1]):
            flat = flat * span[j] + (keys[:, j] - lo[j])
        return np.argsort(flat, kind="stable")
    return np.lexsort(keys.T[::-1])


def _reduce(keys: np.ndarray, acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge accumulator rows sharing a key (rows of ``keys``): sums add, LO takes min, HI takes max."""
    if len(keys) == 0:
        return keys, acc
    order = _sort_order(keys)
    keys, acc = keys[order], acc[order]
    new = np.ones(len(keys), dtype=bool)
    new[1:] = (keys[1:] != keys[:-1]).any(axis=1)
    starts = np.flatnonzero(new)
    if len(starts) == len(keys):
        return keys, acc
    counts = np.diff(np.append(starts, len(keys)))
    longest = int(counts.max())
    if longest > 3:
        out = np.add.reduceat(acc, starts, axis=0)
        out[:, LO] = np.minimum.reduceat(acc[:, LO], starts)
        out[:, HI] = np.maximum.reduceat(acc[:, HI], starts)
        return keys[starts], out
    # Runs of 2-3 rows (an open window meeting the batch's samples of it): adding the j-th row of every run in
    # turn is the same left-to-right sum ``reduceat`` takes, bit for bit, at a third of its cost.
    out = acc[starts]
    for j in range(1, longest):
        at = np.flatnonzero(counts > j)
        more = acc[starts[at] + j]
        lo, hi = np.minimum(out[at, LO], more[:, LO]), np.maximum(out[at, HI], more[:, HI])
        out[at] += more
        out[at, LO] = lo
        out[at, HI] = hi
    return keys[starts], out


def _level_and_spread(m: list[float], beta: list[float], k: int, spread: bool = True) -> tuple[float, float]:
    """Σ(y − β·x) and Σ(y − β·x)² from a window's moment block ``m`` ((k + 2)², row-major over [1, x, y]).

    The sums are taken term by term in the order of ``sum`` over the block's entries (so the floats are the
    same as that loop's); k = 0 and k = 2, the catalog's shapes, are written out.
    """
    if k == 2:
        b0, b1 = beta
        level = m[3] - (0.0 + b0 * m[1] + b1 * m[2])
        if not spread:
            return level, 0.0
        v1, v2 = -b0, -b1
        return level, (0.0 + v1 * v1 * m[5] + v1 * v2 * m[6] + v1 * 1.0 * m[7] + v2 * v1 * m[9] + v2 * v2 * m[10]
                       + v2 * 1.0 * m[11] + 1.0 * v1 * m[13] + 1.0 * v2 * m[14] + 1.0 * 1.0 * m[15])
    if k == 0:
        return m[1] - 0.0, 0.0 + 1.0 * 1.0 * m[3]
    size = k + 2
    level = m[k + 1] - sum(beta[j] * m[1 + j] for j in range(k))
    if not spread:
        return level, 0.0
    v = [0.0, *(-b for b in beta), 1.0]
    return level, sum(v[i] * v[j] * m[i * size + j] for i in range(1, k + 2) for j in range(1, k + 2))


def _levels(m: np.ndarray, beta: np.ndarray, k: int) -> np.ndarray:
    """``_level_and_spread``'s level for many moment blocks (rows of ``m``) and coefficients at once, same sums."""
    shifted = np.zeros(len(m))
    for j in range(k):
        shifted = shifted + beta[:, j] * m[:, 1 + j]
    return m[:, k + 1] - shifted


class _Closing:
    """The windows a batch closes (accumulator rows in closing order) with their statistics as Python values.

    ``rows`` holds each row's columns before the moment block. For the rows of wear signals (``moment_at``: where
    each signal's block sits) it also keeps the block (row-major) and its centring terms ``m[i]·m[j] / n_used`` over
    the block's first row as arrays, one per block layout (``blocks``): numpy computes them for every row at once,
    with the IEEE operations ``_close_channel`` did one float at a time, so the results are bit for bit the same.
    ``moments(row)`` and ``centring(row)`` give one row's as Python lists. ``fast`` holds what
    ``Detector._precompute`` worked out ahead for rows whose channel state is known before the close.
    """

    def __init__(self, a: np.ndarray, starts: np.ndarray, sigs: list[str], moment_at: dict[str, list[int]]) -> None:
        n = a[:, N]
        mean = a[:, SUM] / n
        std = np.sqrt(np.maximum(a[:, SUMSQ] / n - mean * mean, 0.0))
        self.rows: list[list[float]] = a[:, :BASE].tolist()
        self.starts: list[int] = starts.tolist()
        self.sigs = sigs
        self.counts: list[int] = n.astype(np.int64).tolist()
        self.means: list[float] = mean.tolist()
        self.stds: list[float] = std.tolist()
        self.flat = a[:, HI] - a[:, LO] <= 1e-9 * np.maximum(1.0, np.abs(a[:, LO]))  # min = max: maybe stuck
        self.n_used = a[:, N_USED]
        # Per block layout: (row indices, moment blocks, centring terms); per row: (layout number, position).
        self.blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._where: dict[int, tuple[int, int]] | None = None  # built on first use: most rows never need it
        self.fast: dict[int, tuple[float, bool, list[float] | None, tuple[Any, float | None] | None]] = {}
        self.sole: set[int] = set()  # wear-signal rows that are the only closing window of their tractor × signal
        if not len(a):
            return
        layout = {sig: tuple(at) for sig, at in moment_at.items()}
        by_block: dict[tuple[int, ...], list[int]] = {}
        for row, sig in enumerate(sigs):
            at = layout.get(sig)
            if at is not None:
                block = by_block.get(at)
                if block is None:
                    block = by_block[at] = []
                block.append(row)
        nu = self.n_used
        for at, rows in by_block.items():
            size = math.isqrt(len(at))
            idx = np.asarray(rows, dtype=np.int64)
            m = a[np.ix_(idx, np.asarray(at, dtype=np.int64))]
            first = m[:, :size]
            with np.errstate(divide="ignore", invalid="ignore"):  # n_used = 0: rows the close never centres
                centring = (first[:, :, None] * first[:, None, :]).reshape(len(idx), -1) / nu[idx, None]
            self.blocks.append((idx, m, centring))

    def moments(self, row: int) -> list[float]:
        """A wear-signal row's moment block ((k + 2)², row-major over [1, x, y])."""
        number, pos = self._locate(row)
        return self.blocks[number][1][pos].tolist()

    def centring(self, row: int) -> list[float]:
        """A wear-signal row's centring terms, laid out as its moment block."""
        number, pos = self._locate(row)
        return self.blocks[number][2][pos].tolist()

    def _locate(self, row: int) -> tuple[int, int]:
        """(block layout number, position in it) of a wear-signal row."""
        if self._where is None:
            self._where = {}
            for number, (idx, _, _) in enumerate(self.blocks):
                self._where.update((row, (number, pos)) for pos, row in enumerate(idx.tolist()))
        return self._where[row]


def _trend_state(fitted: Trend | None, last_t: float) -> list[Any] | None:
    """A fitted trend as a channel state keeps it (with the time of its last point)."""
    if fitted is None:
        return None
    return [fitted.level, fitted.slope, fitted.slope_lo, fitted.slope_hi, fitted.n, fitted.scale, last_t]


class Detector:
    """The compute path: batch of samples + per-tractor states → updated states, trend rows, health, alerts."""

    close_together = True  # close every tractor's windows in one pass (False: ``_close`` per tractor, the reference)
    precompute = True  # work out the first closing window per tractor × signal for all at once (False: the reference)
    batch_fits = True  # fit the window trends of a close together at its end (False: each as its window closes)
    _fits: list[tuple[dict[str, Any], list[Any], tuple[Any, ...] | None]] | None = None
    bitmap_as_int = True  # dedupe on the bitmap as a Python integer (False: the numpy path, kept as the reference)

    def __init__(self, parts: list[Part], params: Params) -> None:
        self.params = params
        self.parts = parts
        self.channels = channels_for(parts)
        self.kmax = max((c.k for c in self.channels.values()), default=0)
        self.d = self.kmax + 2
        self.width = BASE + self.d * self.d
        self.decay = 0.5 ** (1.0 / params.halflife_windows)
        # Decoded forms of the texts this detector last wrote into each tractor's state (text, decoded).
        self._dd_memo: dict[str, tuple[str, int]] = {}
        self._acc_memo: dict[str, tuple[str, np.ndarray]] = {}
        # Per wear signal: where its windows' (k + 2)² moment block sits in an accumulator row (row-major).
        self._moment_of: dict[str, list[int]] = {}
        for sig, ch in self.channels.items():
            sel = [*range(ch.k + 1), self.d - 1]
            self._moment_of[sig] = [BASE + i * self.d + j for i in sel for j in sel]
        # Squared covariate scales of each channel, for the normaliser's ridge.
        self.scales_sq = {sig: [max(abs(r), 1.0) ** 2 for r in ch.refs.tolist()] for sig, ch in self.channels.items()}
        # Nominal → failure distance of each channel in regression space (the widest of its parts).
        self.spans = {sig: max(abs(ch.transform(p.nominal) - ch.transform(p.failure)) for p in ch.parts)
                      for sig, ch in self.channels.items()}
        # …and in signal units (the CUSUM's floor).
        self.part_spans = {sig: max(abs(p.nominal - p.failure) for p in ch.parts) for sig, ch in self.channels.items()}

    # -------------------------------------------------------------- ingest
    def _seen(self, st: dict[str, Any]) -> tuple[int | None, np.ndarray]:
        """A tractor's dedupe state: highest seq seen and bits of the recent seqs (bit j = seq ``hwm - j`` seen)."""
        m = self.params.max_seqs
        dd = st.get("dd")
        if dd:
            packed = np.frombuffer(base64.b64decode(dd[1]), dtype=np.uint8)
            return int(dd[0]), np.unpackbits(packed, count=m).astype(bool)
        bits = np.zeros(m, dtype=bool)
        legacy = st.pop("seqs", None)  # states written before the bitmap: a list of the last seqs seen
        if not legacy:
            return None, bits
        hwm = int(max(legacy))
        off = hwm - np.asarray(legacy, dtype=np.int64)
        bits[off[off < m]] = True
        return hwm, bits

    def dedupe(self, frame: pd.DataFrame, states: dict[str, dict[str, Any]], out: Outputs) -> pd.DataFrame:
        """Drop samples of messages already seen (QoS 1 and redelivery duplicates), in and across batches.

        Per tractor the state keeps the highest seq seen and a bitmap of the ``max_seqs`` seqs below it; a seq
        older than that range counts as seen (its windows are long closed).
        """
        before = len(frame)
        frame = frame.drop_duplicates(subset=["tractor_id", "seq", "ts"])
        keep = np.ones(len(frame), dtype=bool)
        seqs = frame["seq"].to_numpy()
        m = self.params.max_seqs
        for tid, idx in _groups(frame["tractor_id"].to_numpy()):
            st = states[tid]
            if self.bitmap_as_int and m % 8 == 0 and (st.get("dd") or not st.get("seqs")):
                self._dedupe_bits(tid, st, seqs[idx].tolist(), idx, keep)
                continue
            hwm, bits = self._seen(st)
            s = seqs[idx]
            if hwm is None:
                fresh = s
            else:
                off = hwm - s
                old = off >= m
                inside = np.flatnonzero((off >= 0) & ~old)
                old[inside] = bits[off[inside]]
                if old.any():
                    keep[idx[old]] = False
                    fresh = s[~old]
                else:
                    fresh = s
            if not len(fresh):
                if hwm is not None and not st.get("dd"):  # keep a legacy list's seqs as the bitmap
                    st["dd"] = _seen_state(hwm, bits)
                continue
            top = int(fresh.max())
            if hwm is None or top > hwm:
                shift = m if hwm is None else min(top - hwm, m)
                bits = np.concatenate([np.zeros(shift, dtype=bool), bits[:m - shift]])
                hwm = top
            off = hwm - fresh
            bits[off[off < m]] = True
            st["dd"] = _seen_state(hwm, bits)
        frame = frame[keep]
        out.count("duplicates_dropped", before - len(frame))
        return frame

    def _dedupe_bits(self, tid: str, st: dict[str, Any], seqs: list[int], idx: np.ndarray, keep: np.ndarray) -> None:
        """``dedupe`` for one tractor on the bitmap as a Python integer (bit ``max_seqs - 1 - j`` = seq ``hwm - j``).

        The same verdicts and stored bitmap as the numpy path, without a dozen small numpy calls per tractor; the
        integer of the bitmap this detector wrote last is reused while the state still holds that very text.
        """
        m = self.params.max_seqs
        dd = st.get("dd")
        if dd:
            hwm: int | None = int(dd[0])
            memo = self._dd_memo.get(tid)
            x = memo[1] if memo is not None and memo[0] is dd[1] else int.from_bytes(base64.b64decode(dd[1]), "big")
        else:
            st.pop("seqs", None)  # an empty legacy list: nothing seen yet
            hwm, x = None, 0
        fresh: list[int] = []
        for i, s in enumerate(seqs):
            if hwm is not None:
                off = hwm - s
                if off >= m or (off >= 0 and (x >> (m - 1 - off)) & 1):
                    keep[idx[i]] = False
                    continue
            fresh.append(s)
        if not fresh:
            return
        top = max(fresh)
        if hwm is None or top > hwm:
            x >>= m if hwm is None else min(top - hwm, m)
            hwm = top
        for s in fresh:
            off = hwm - s
            if off < m:
                x |= 1 << (m - 1 - off)
        text = base64.b64encode(x.to_bytes(m // 8, "big")).decode()
        st["dd"] = [hwm, text]
        _remember(self._dd_memo, tid, (text, x))

    def _open_acc(self, tid: str, op: dict[str, Any]) -> np.ndarray:
        """The accumulators of a tractor's open windows (reused from ``_close`` while the state holds its text)."""
        memo = self._acc_memo.get(tid)
        if memo is not None and memo[0] is op["acc"]:
            return memo[1]
        return _unpack(op["acc"], op["width"])

    def _gate_arrays(self, ch: Channel, sigs: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per tractor (``sigs``: their states' ``sig``): gating level (regression space), covariate coefficients, gate
        half-width (inf = off)."""
        n = len(sigs)
        level = np.zeros(n)
        beta = np.zeros((n, max(ch.k, 1)))
        width = np.full(n, np.inf)
        name = ch.signal
        at: list[int] = []
        levels: list[float] = []
        betas: list[list[float]] = []
        sigmas: list[float] = []
        for i, sig in enumerate(sigs):  # one pass, gathered in lists: numpy item assignment per tractor costs more
            cs = sig.get(name)
            if not cs:
                continue
            lv, b = cs.get("level"), cs.get("beta")
            if lv is None or b is None:
                continue
            at.append(i)
            levels.append(lv)
            betas.append(b)
            sigmas.append(cs["sigma"])
        if at:
            idx = np.asarray(at, dtype=np.int64)
            level[idx] = levels
            if ch.k:
                beta[idx, :ch.k] = betas
            # _gate_width for all at once (numpy's maximum and products give the same floats)
            width[idx] = np.maximum(self.params.gate_sigmas * np.array(sigmas, dtype=float),
                                    self.params.gate_span * self.spans[ch.signal])
        return level, beta, width

    def _gate_width(self, ch: Channel, cs: dict[str, Any]) -> float:
        """Half-width of a channel's sample gate (regression space): residual sigmas, at least a share of the span."""
        return max(self.params.gate_sigmas * cs["sigma"], self.params.gate_span * self.spans[ch.signal])

    def aggregate(self, frame: pd.DataFrame, states: dict[str, dict[str, Any]], signals: list[str],
                  tids: list[str], out: Outputs) -> tuple[np.ndarray, np.ndarray]:
        """Window accumulators of the batch keyed (tractor index, window start, signal index); numpy per signal.

        The rows are put in (tractor, window) order once; each signal then sums its finite readings per group
        with ``reduceat`` (in arrival order within a group, as one sort over every signal would).
        """
        if not len(frame):
            return np.zeros((0, 3), dtype=np.int64), np.zeros((0, self.width))
        codes = pd.Index(tids).get_indexer(frame["tractor_id"]).astype(np.int64)
        w = (np.floor(frame["ts"].to_numpy() / self.params.window_s) * self.params.window_s).astype(np.int64)
        order = _sort_order(np.column_stack([codes, w]))
        codes, w = codes[order], w[order]
        keys, accs = [], []
        d, kmax = self.d, self.kmax
        data = {c: frame[c].to_numpy(dtype=np.float64)[order] for c in frame.columns if c not in META}
        sigs = [states[t]["sig"] for t in tids]
        for si, sig in enumerate(signals):
            if sig not in data:
                continue
            y = data[sig]
            rows = np.flatnonzero(np.isfinite(y))
            if not len(rows):
                continue
            yv = y[rows]
            c = codes[rows]
            wr = w[rows]
            new = np.ones(len(rows), dtype=bool)
            new[1:] = (c[1:] != c[:-1]) | (wr[1:] != wr[:-1])
            starts = np.flatnonzero(new)
            ch = self.channels.get(sig)
            if ch is None:  # a plain signal: only the moments of the raw value
                a = np.empty((len(rows), 5))
                a[:, N] = 1.0
                a[:, SUM] = yv
                a[:, SUMSQ] = yv * yv
                a[:, LO] = yv
                a[:, HI] = yv
                red = np.zeros((len(starts), self.width))
                red[:, :LO] = np.add.reduceat(a[:, :LO], starts, axis=0)
                red[:, LO] = np.minimum.reduceat(yv, starts)
                red[:, HI] = np.maximum.reduceat(yv, starts)
                keys.append(np.column_stack([c[starts], wr[starts], np.full(len(starts), si)]))
                accs.append(red)
                continue
            a = np.zeros((len(rows), self.width))
            a[:, N] = 1.0
            a[:, SUM] = yv
            a[:, SUMSQ] = yv * yv
            a[:, LO] = yv
            a[:, HI] = yv

            def column(name: str, rows: np.ndarray = rows) -> np.ndarray:
                if name not in data:
                    return np.full(len(rows), np.nan)
                return data[name][rows]

            z = np.zeros((len(rows), d))
            z[:, 0] = 1.0
            ok = np.ones(len(rows), dtype=bool)
            for j, cov in enumerate(ch.covariates):
                x = column(cov)
                z[:, 1 + j] = x - ch.refs[j]
                ok &= np.isfinite(x)
            for cov, lo, hi in ch.band:
                x = column(cov)
                ok &= (x >= lo) & (x <= hi)
            if ch.log:
                ok &= yv > 0
                yt = np.log(np.where(yv > 0, yv, 1.0))
            else:
                yt = yv
            if ch.relative_to is not None:  # e.g. temperature rise over ambient, at the reference ambient
                cond = column(ch.relative_to[0])
                ok &= np.isfinite(cond)
                yt = yt - np.nan_to_num(cond) + ch.relative_to[1]
            z[:, kmax + 1] = yt
            level, beta, width = self._gate_arrays(ch, sigs)
            pred = level[c] + (np.nan_to_num(z[:, 1:1 + ch.k]) * beta[c, :ch.k]).sum(axis=1)
            rej = ok & (np.abs(yt - pred) > width[c])
            used = ok & ~rej
            z[~used] = 0.0
            a[:, BASE:] = (z[:, :, None] * z[:, None, :]).reshape(len(rows), d * d)
            a[:, N_USED] = used
            a[:, N_REJ] = rej
            a[:, SUM_REJ] = np.where(rej, yt, 0.0)
            out.count("samples_rejected", int(rej.sum()))
            red = np.add.reduceat(a, starts, axis=0)
            red[:, LO] = np.minimum.reduceat(yv, starts)
            red[:, HI] = np.maximum.reduceat(yv, starts)
            keys.append(np.column_stack([c[starts], wr[starts], np.full(len(starts), si)]))
            accs.append(red)
        if not keys:
            return np.zeros((0, 3), dtype=np.int64), np.zeros((0, self.width))
        return _reduce(np.concatenate(keys), np.concatenate(accs))

    # -------------------------------------------------------------- batch
    def process(self, frame: pd.DataFrame, states: dict[str, dict[str, Any]],
                partitions: dict[str, dict[str, Any]] | None = None,
                load_state: Any = None) -> Outputs:
        """Run one batch through the detector; ``states`` (by tractor) and ``partitions`` are updated in place.

        ``load_state(tid)`` fetches the state of a quiet tractor whose windows the partition watermark closes.
        """
        out = Outputs()
        for tid in frame["tractor_id"].unique().tolist():
            states.setdefault(tid, new_state())
        frame = self.dedupe(frame, states, out)
        out.count("readings", float(sum(int(np.count_nonzero(~np.isnan(frame[c].to_numpy(dtype=np.float64))))
                                        for c in frame.columns if c not in META)))
        rounds = self._rounds(frame, states)
        if rounds is None:
            frame = self._step(frame, states, out)
        else:
            # Tractors without samples in a later round have nothing new to close: only the round's own go in.
            kept = [self._step(frame[rounds == 0], states, out)]
            for r in range(1, int(rounds.max()) + 1):
                part = frame[rounds == r]
                kept.append(self._step(part, {t: states[t] for t in part["tractor_id"].unique().tolist()}, out))
            frame = pd.concat(kept)
        if partitions is not None:
            self._partition_progress(frame, states, partitions, load_state, out)
        return out

    def _rounds(self, frame: pd.DataFrame, states: dict[str, dict[str, Any]]) -> np.ndarray | None:
        """Per sample, the round of the batch it goes in (None: all in one); rounds make results batch-independent.

        A tractor's windows close when its watermark (the latest event time seen) passes their end plus the
        lateness, and closing them teaches the sample gate the channel's new level. Round r of a tractor holds its
        samples that arrived after its watermark crossed r closing boundaries within this batch, so each sample is
        gated against the levels of every window closed before it arrived, however the stream was cut into
        batches (a batch spanning hours of a replay gates as a stream of one-record batches would).
        """
        if len(frame) < 2:
            return None
        p = self.params
        codes, uniq = pd.factorize(frame["tractor_id"], sort=False)
        start = np.array([states[t]["wm"] for t in uniq.tolist()], dtype=np.float64)
        ts = pd.Series(frame["ts"].to_numpy(dtype=np.float64))
        # The tractor's watermark when each sample arrived: its state's, or the latest of its earlier samples.
        before = ts.groupby(codes).cummax().groupby(codes).shift(1).to_numpy()
        before = np.fmax(before, start[codes])
        epoch = np.floor((before - p.lateness_s) / p.window_s)
        crossed = pd.Series(epoch).groupby(codes).diff().to_numpy() > 0
        if not crossed.any():
            return None
        return pd.Series(crossed.astype(np.int64)).groupby(codes).cumsum().to_numpy()

    def _step(self, frame: pd.DataFrame, states: dict[str, dict[str, Any]], out: Outputs) -> pd.DataFrame:
        """One round of a batch: drop late samples, aggregate into windows, close the windows the watermark passed.

        Returns the round's samples without the late ones.
        """
        p = self.params
        tids = sorted(states)
        signals = sorted({c for c in frame.columns if c not in META}
                         | {s for st in states.values() if st["open"] for s in st["open"]["sig"]})
        sig_index = {s: i for i, s in enumerate(signals)}

        # Late samples: their window closed already (tractor watermark), so they cannot be placed any more.
        if len(frame):
            wm = pd.Series({t: states[t]["wm"] for t in tids})
            w = np.floor(frame["ts"].to_numpy() / p.window_s) * p.window_s
            late = w + p.window_s + p.lateness_s <= wm.reindex(frame["tractor_id"]).to_numpy()
            if late.any():
                open_keys = {(t, int(k)) for t in tids if states[t]["open"]
                             for k in np.unique(np.asarray(states[t]["open"]["w"]))}
                idx = np.flatnonzero(late)
                still_open = [(t, int(x)) in open_keys for t, x in zip(frame["tractor_id"].to_numpy()[idx],
                                                                        w[idx], strict=True)]
                late[idx[np.asarray(still_open, dtype=bool)]] = False
                out.count("late_samples_dropped", int(late.sum()))
                frame = frame[~late]

        keys, acc = self.aggregate(frame, states, signals, tids, out)
        # Merge with the windows still open in the state, then write the union back per tractor.
        old_codes: list[int] = []
        old_w: list[Any] = []
        old_sig: list[int] = []
        old_acc = []
        for code, tid in enumerate(tids):
            op = states[tid]["open"]
            if not op or not op["w"]:
                continue
            if op["width"] != self.width:  # the catalog changed shape: restart the open windows
                out.count("open_windows_discarded", len(op["w"]))
                continue
            old_codes += [code] * len(op["sig"])
            old_w += op["w"]
            old_sig += [sig_index[s] for s in op["sig"]]
            old_acc.append(self._open_acc(tid, op))
        if old_acc:  # one key array for every tractor's open windows, not one per tractor
            old_keys = np.column_stack([np.array(old_codes, dtype=np.int64), np.array(old_w),
                                        np.array(old_sig, dtype=np.int64)])
            keys, acc = _reduce(np.concatenate([keys, old_keys]), np.concatenate([acc, *old_acc]))
        watermarks = frame.groupby("tractor_id")["ts"].max() if len(frame) else pd.Series(dtype=float)
        for tid, value in watermarks.items():
            states[tid]["wm"] = max(states[tid]["wm"], float(value))

        if self.close_together:
            self._close_all(tids, states, keys, acc, signals, out)
        else:
            bounds = np.searchsorted(keys[:, 0], np.arange(len(tids) + 1)) if len(keys) else np.zeros(len(tids) + 1,
                                                                                                       int)
            for code, tid in enumerate(tids):
                lo, hi = bounds[code], bounds[code + 1]
                self._close(tid, states[tid], keys[lo:hi], acc[lo:hi], signals, states[tid]["wm"], out)
        return frame

    def _partition_progress(self, frame: pd.DataFrame, states: dict[str, dict[str, Any]],
                            partitions: dict[str, dict[str, Any]], load_state: Any, out: Outputs) -> None:
        """Advance each partition's watermark and close the open windows of tractors that went quiet."""
        p = self.params
        for part, group in frame.groupby("partition") if len(frame) else []:
            ps = partitions.setdefault(str(part), {"wm": 0.0, "open": {}})
            # The median event time of the batch: a few skewed clocks cannot drag the partition ahead.
            ps["wm"] = max(ps["wm"], float(group["ts"].median()))
            for tid in group["tractor_id"].unique().tolist():
                op = states[tid]["open"]
                if op and op["w"]:
                    ps["open"][tid] = float(min(op["w"]))
                else:
                    ps["open"].pop(tid, None)
        for ps in partitions.values():
            horizon = ps["wm"] - p.idle_close_s
            quiet = [t for t, w in ps["open"].items() if w + p.window_s + p.lateness_s <= horizon]
            for tid in quiet:
                st = states.get(tid) or (load_state(tid) if load_state else None)
                if st is None:
                    ps["open"].pop(tid, None)
                    continue
                states[tid] = st
                op = st["open"]
                if not op or not op["w"]:
                    ps["open"].pop(tid, None)
                    continue
                sigs = sorted(set(op["sig"]))
                keys = np.column_stack([np.zeros(len(op["w"]), dtype=np.int64), op["w"],
                                        [sigs.index(s) for s in op["sig"]]])
                if op["width"] != self.width:
                    st["open"] = None
                    ps["open"].pop(tid, None)
                    continue
                keys, acc = _reduce(keys, self._open_acc(tid, op))
                # Close as if the tractor's own clock had reached the partition's (minus the idle allowance).
                st["wm"] = max(st["wm"], horizon)
                self._close(tid, st, keys, acc, sigs, st["wm"], out)
                out.count("windows_closed_idle", 1)
                op = st["open"]
                if op and op["w"]:
                    ps["open"][tid] = float(min(op["w"]))
                else:
                    ps["open"].pop(tid, None)

    # -------------------------------------------------------------- closing windows
    def _close(self, tid: str, st: dict[str, Any], keys: np.ndarray, acc: np.ndarray, signals: list[str],
               wm: float, out: Outputs) -> None:
        """Close the windows the watermark passed (oldest first) and keep the rest open in the state."""
        p = self.params
        if not len(keys):
            st["open"] = None
            return
        closable = keys[:, 1] + p.window_s + p.lateness_s <= wm
        rest = ~closable
        self._keep_open(tid, st, keys[rest, 1].tolist(), [signals[i] for i in keys[rest, 2]], acc[rest])
        if not closable.any():
            return
        idx = np.flatnonzero(closable)
        idx = idx[np.lexsort((keys[idx, 2], keys[idx, 1]))]
        closing = _Closing(acc[idx], keys[idx, 1], [signals[i] for i in keys[idx, 2].tolist()], self._moment_of)
        self._precompute(closing, np.zeros(len(idx), dtype=np.int64), keys[idx, 2], [st])
        with self._fits_batched(out):
            self._close_windows(tid, st, closing, 0, len(idx), out)

    def _keep_open(self, tid: str, st: dict[str, Any], w: list[Any], sigs: list[str], kept: np.ndarray) -> None:
        """Store the windows still open (none: ``open`` = None), remembering their decoded accumulators."""
        if not len(kept):
            st["open"] = None
            return
        st["open"] = {"w": w, "sig": sigs, "width": self.width, "acc": _pack(kept)}
        _remember(self._acc_memo, tid, (st["open"]["acc"], kept))

    def _close_windows(self, tid: str, st: dict[str, Any], c: _Closing, lo: int, hi: int, out: Outputs) -> None:
        """Trend rows (and channel updates) for closing windows ``lo:hi`` of ``c``, all of tractor ``tid``."""
        p = self.params
        stuck = self._stuck_windows(st, c, lo, hi) if c.flat[lo:hi].any() else set()
        rows, starts, sigs = c.rows, c.starts, c.sigs
        for row in range(lo, hi):
            w = starts[row]
            sig = sigs[row]
            r = {"tractor_id": tid, "signal": sig, "window_start": _dt(w), "window_end": _dt(w + p.window_s),
                 "count": c.counts[row], "mean": c.means[row], "min": rows[row][LO], "max": rows[row][HI],
                 "std": c.stds[row], "n_used": 0, "norm_value": None, "level": None, "slope_per_h": None,
                 "slope_lo": None, "slope_hi": None, "quality_flags": ""}
            ch = self.channels.get(sig)
            if ch is not None:
                self._close_channel(tid, st, ch, w, rows[row], c, row, r, out, self._frozen(ch, w, stuck))
            out.windows.append(r)

    def _stuck_windows(self, st: dict[str, Any], c: _Closing, lo: int, hi: int) -> set[tuple[int, str]]:
        """(window start, signal) of closing rows ``lo:hi`` (one tractor's) whose sensor is stuck: one value all along.

        Three equal samples are stuck; fewer are stuck too when they repeat the value a wear signal was last seen
        stuck at (a stuck sensor's short windows at the start and end of a working day).
        """
        out: set[tuple[int, str]] = set()
        starts, sigs = c.starts, c.sigs
        for row in (np.flatnonzero(c.flat[lo:hi]) + lo).tolist():
            sig, value = sigs[row], c.rows[row][LO]
            cs = st["sig"].get(sig) if sig in self.channels else None
            if c.rows[row][N] >= 3:
                out.add((starts[row], sig))
                if cs is not None:
                    cs["stuckv"] = value
            elif cs is not None and cs.get("stuckv") == value:
                out.add((starts[row], sig))
        return out

    def _frozen(self, ch: Channel, w: int, stuck: set[tuple[int, str]]) -> bool:
        """True when a channel's window is stuck, or the reading it is compared against (``relative_to``) is."""
        return (w, ch.signal) in stuck or (ch.relative_to is not None and (w, ch.relative_to[0]) in stuck)

    def _close_all(self, tids: list[str], states: dict[str, dict[str, Any]], keys: np.ndarray, acc: np.ndarray,
                   signals: list[str], out: Outputs) -> None:
        """``_close`` for every tractor of a batch (keys sorted by tractor code), the numpy part done once for all.

        Each tractor's windows close in the order ``_close`` closes them, tractor after tractor, with the same
        arithmetic; only the per-tractor numpy calls are gone.
        """
        p = self.params
        count = len(tids)
        wm = np.array([states[t]["wm"] for t in tids], dtype=np.float64)
        codes = keys[:, 0]
        closable = keys[:, 1] + p.window_s + p.lateness_s <= wm[codes] if len(keys) else np.zeros(0, dtype=bool)
        rest = np.flatnonzero(~closable)
        shut = np.flatnonzero(closable)
        shut = shut[np.lexsort((keys[shut, 2], keys[shut, 1], codes[shut]))]
        edges = np.arange(count + 1)
        rest_at = np.searchsorted(codes[rest], edges).tolist()
        shut_at = np.searchsorted(codes[shut], edges).tolist()
        kept_acc = acc[rest]
        kept_w = keys[rest, 1].tolist()
        kept_sig = [signals[i] for i in keys[rest, 2].tolist()]
        closing = _Closing(acc[shut], keys[shut, 1], [signals[i] for i in keys[shut, 2].tolist()], self._moment_of)
        self._precompute(closing, codes[shut], keys[shut, 2], [states[t] for t in tids])
        with self._fits_batched(out):
            for code, tid in enumerate(tids):
                st = states[tid]
                lo, hi = rest_at[code], rest_at[code + 1]
                self._keep_open(tid, st, kept_w[lo:hi], kept_sig[lo:hi], kept_acc[lo:hi].copy())
                self._close_windows(tid, st, closing, shut_at[code], shut_at[code + 1], out)

    def _precompute(self, c: _Closing, codes: np.ndarray, sig_codes: np.ndarray, sts: list[dict[str, Any]]) -> None:
        """Level, noise verdict and new condition moments of closing wear-signal windows, numpy across tractors.

        Only for the first closing window of each tractor × signal (``codes``: each row's index into ``sts``, the
        tractors' states; ``sig_codes``: its signal's number): its channel state is the one before the close, as
        ``_close_channel`` will find it. The arithmetic is ``_close_channel``'s, operation for operation
        (``_level_and_spread``'s term order, Python's ``max``, ``solve_moments``' pivots), so every float is the
        same; ``c.fast`` gets (level, noisy, new moments, (regression, level under it) or None where no refit is
        due) per row with n_used ≥ 1. ``c.sole`` gets the rows that are the only closing window of their tractor ×
        signal (``batch_fits``).
        """
        firsts = []
        for idx, _, _ in c.blocks:  # rows in closing order: a key's first row is its earliest window
            _, first, count = np.unique(codes[idx] * (int(sig_codes.max()) + 1) + sig_codes[idx], return_index=True,
                                        return_counts=True)
            c.sole.update(idx[first[count == 1]].tolist())
            firsts.append(first)
        if not self.precompute:
            return
        nus = c.n_used
        channel_states = [st["sig"] for st in sts]
        for (idx, m, centring), first in zip(c.blocks, firsts, strict=True):
            size = math.isqrt(m.shape[1])
            k = size - 2
            picked: list[int] = []
            olds: list[list[float]] = []
            betas: list[list[float]] = []
            sigmas: list[float] = []
            refits: list[bool] = []  # the close will re-solve the condition regression (no beta yet, or it is due)
            zeros_s, zeros_b = [0.0] * (size * size), [0.0] * k
            due = self.params.refit_windows - 1
            first = first[nus[idx[first]] >= 1]
            for pos, row, code in zip(first.tolist(), idx[first].tolist(), codes[idx[first]].tolist(), strict=True):
                cs = channel_states[code].get(c.sigs[row])
                if cs is None:
                    old, beta, sigma, refit = zeros_s, zeros_b, 0.0, True
                else:
                    old = cs["S"] or zeros_s
                    refit = cs["beta"] is None or cs["refit"] >= due
                    beta = cs["beta"] if cs["beta"] is not None else zeros_b
                    sigma = cs["sigma"]
                    if len(old) != size * size or len(beta) != k:  # a changed catalog: leave it to the close
                        continue
                picked.append(pos)
                olds.append(old)
                betas.append(beta)
                sigmas.append(sigma)
                refits.append(refit)
            if not picked:
                continue
            at = np.asarray(picked, dtype=np.int64)
            mm, cc, nu = m[at], centring[at], nus[idx[at]]
            b = np.asarray(betas, dtype=np.float64).reshape(len(at), k)
            sigma_a = np.asarray(sigmas, dtype=np.float64)
            level = _levels(mm, b, k)
            v = [np.zeros(len(at)), *(-b[:, j] for j in range(k)), np.ones(len(at))]
            spread = np.zeros(len(at))
            for i in range(1, k + 2):
                for j in range(1, k + 2):
                    spread = spread + v[i] * v[j] * mm[:, i * size + j]
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                u = level / nu
                var = spread / nu - u * u
                var = np.where(0.0 > var, 0.0, var)  # Python's max(var, 0.0), NaN and -0.0 included
                noisy = (nu >= 3) & (sigma_a > 0) & (np.sqrt(var) > self.params.noisy_ratio * sigma_a)
                old_a = np.asarray(olds, dtype=np.float64)
                new_s = self.decay * old_a + mm - cc
                new_s[:, 0] = self.decay * old_a[:, 0] + nu
            # The regression re-solved where the close will (its beta moves the window's level too).
            solve = np.flatnonzero(np.asarray(refits, dtype=bool) & ~noisy & np.isfinite(new_s).all(axis=1))
            rows = idx[at].tolist()
            refitted: list[tuple[tuple[list[float], float] | None, float | None] | None] = [None] * len(rows)
            by_signal: dict[str, list[int]] = {}  # a block's signals share its shape, not their scales
            for i in solve.tolist():
                by_signal.setdefault(c.sigs[rows[i]], []).append(i)
            for sig, group in by_signal.items():
                these = np.asarray(group, dtype=np.int64)
                coef, sig_a, solved = solve_moments_many(new_s[these], size, self.scales_sq[sig], 1e-5)
                with np.errstate(divide="ignore", invalid="ignore"):
                    u_after = _levels(mm[these], coef[:, 1:], k) / nu[these]
                for i, ok, cf, sg, ua in zip(group, solved.tolist(), coef.tolist(), sig_a.tolist(), u_after.tolist(),
                                             strict=True):
                    refitted[i] = ((cf, sg), ua) if ok else (None, None)
            ahead = zip(u.tolist(), noisy.tolist(), new_s.tolist(), refitted, strict=True)
            c.fast.update(zip(rows, ahead, strict=True))

    def _close_channel(self, tid: str, st: dict[str, Any], ch: Channel, w: int, a: list[float], c: _Closing,
                       row: int, r: dict[str, Any], out: Outputs, stuck: bool = False) -> None:
        """Normalise one closed window of a wear signal, update its trend and change detector, assess its parts.

        ``a``: the window's accumulator columns before the moment block; ``c``, ``row``: where its moment block
        and centring terms are (``_Closing``), with what ``_precompute`` worked out ahead for it, if anything.
        """
        p = self.params
        cs = st["sig"].get(ch.signal)
        if cs is None:
            cs = st["sig"][ch.signal] = {"S": None, "beta": None, "sigma": 0.0, "level": None, "hist": [],
                                         "base": None, "trend": None, "cp": 0.0, "cn": 0.0, "rej": 0, "since": 0,
                                         "refit": 0}
        flags: list[str] = []
        nu = a[N_USED]
        k = ch.k
        t_h = (w + p.window_s / 2) / 3600.0
        norm = None
        if stuck:  # a stuck sensor says nothing about the part: neither a value nor evidence that the level moved
            flags.append("stuck")
        elif nu >= 1:
            cs["rej"] = 0
            cs["rejv"] = []
            # Worked out ahead (``_precompute``) for a tractor × signal's first closing window; otherwise in plain
            # floats: a window's moment block is at most 4 × 4, numpy calls would cost more than the maths.
            size = k + 2
            ahead = c.fast.get(row)
            m: list[float] | None = None
            new_s: list[float] | None = None
            refit: tuple[Any, float | None] | None = None
            if ahead is not None:
                u, noisy, new_s, refit = ahead
            else:
                m = c.moments(row)
                beta = cs["beta"] if cs["beta"] is not None else [0.0] * k
                u, vmv = _level_and_spread(m, beta, k)
                u /= nu
                resid_var = max(vmv / nu - u * u, 0.0)
                noisy = nu >= 3 and cs["sigma"] > 0 and math.sqrt(resid_var) > p.noisy_ratio * cs["sigma"]
            if noisy:
                flags.append("noisy")
            else:
                # Pool only the scatter *within* windows: wear moves the level between windows, not inside one,
                # so the condition effects are learnt free of the wear trend.
                if new_s is None:
                    old = cs["S"] or [0.0] * (size * size)
                    decay = self.decay
                    new_s = [decay * o + x - cc for o, x, cc in zip(old, m or c.moments(row), c.centring(row),
                                                                    strict=True)]
                    new_s[0] = decay * old[0] + nu
                cs["S"] = new_s
                cs["refit"] += 1
                if cs["beta"] is None or cs["refit"] >= p.refit_windows:
                    fit, u_after = refit or (solve_moments(new_s, size, self.scales_sq[ch.signal], 1e-5), None)
                    if fit is not None:
                        cs["beta"], cs["sigma"], cs["refit"] = fit[0][1:], fit[1], 0
                        u = u_after if u_after is not None else _level_and_spread(
                            m or c.moments(row), cs["beta"], k, spread=False)[0] / nu
                if new_s[0] >= p.min_samples:
                    norm = ch.untransform(u)
                cs["level"] = u
                if nu < 2:
                    flags.append("sparse")
        elif a[N_REJ] > 0 and self._within_gate(ch, cs, a[SUM_REJ] / a[N_REJ]):
            # Gated against an older level (a window that closed after these samples arrived moved it): under the
            # current level these samples pass, so their mean (not condition-normalised) is the window's value.
            cs["rej"] = 0
            cs["rejv"] = []
            norm = ch.untransform(a[SUM_REJ] / a[N_REJ])
            flags.append("regated")
        elif a[N_REJ] > 0:
            flags.append("rejected")
            cs["rej"] += 1
            rejv = cs.setdefault("rejv", [])
            rejv.append([_hour(t_h), a[SUM_REJ] / a[N_REJ]])  # the rejected samples' mean, regression space
            del rejv[:-p.reject_run]
            if cs["rej"] >= p.reject_run:
                level = cs["level"]
                sides = {u > level for _, u in rejv} if level is not None else set()
                if len(sides) == 1:
                    # Not spikes and not a noise burst (those scatter both ways): the level really moved to where
                    # the rejected samples sit (sudden wear, a large calibration step). Gate around the new level
                    # at once and hand the rejected windows to the trend as a step.
                    cs["level"] = statistics.median([u for _, u in rejv])
                    self._relearn(tid, st, cs, ch, [(t, ch.untransform(u)) for t, u in rejv], w, r, out)
                    flags.append("change")
                elif level is None:
                    self._change(cs, keep=0)
                cs["rej"] = 0
                cs["rejv"] = []
        r["n_used"] = int(nu)
        if norm is not None:
            r["norm_value"] = norm
            if "sparse" not in flags:
                self._update_trend(tid, st, cs, ch, t_h, norm, w, flags, r, out, defer=row in c.sole)
        r["quality_flags"] = ",".join(flags)

    def _within_gate(self, ch: Channel, cs: dict[str, Any], u: float) -> bool:
        """True when regression-space value ``u`` passes the sample gate around the channel's current level."""
        if cs.get("level") is None or cs.get("beta") is None:
            return False
        return abs(u - cs["level"]) <= self._gate_width(ch, cs)

    def _relearn(self, tid: str, st: dict[str, Any], cs: dict[str, Any], ch: Channel, vals: list[tuple[float, float]],
                 w: int, r: dict[str, Any], out: Outputs) -> None:
        """A step seen through the sample gate: shift the day history by it, restart the window trend on its windows.

        ``vals`` are (hour, approximate normalised value) of the fully rejected windows that showed the step.
        """
        new = statistics.median([v for _, v in vals])
        prev = cs["hist"][-1][1] if cs["hist"] else None
        shift = new - prev if prev is not None and cs["base"] is not None else 0.0
        days = [[t, v + shift] for t, v in cs.get("days", [])]
        self._change(cs, keep=0)
        cs["days"] = days
        for t_h, v in vals:
            self._update_trend(tid, st, cs, ch, t_h, v, w, [], r, out)

    def _change(self, cs: dict[str, Any], keep: int) -> None:
        cs["hist"] = cs["hist"][-keep:] if keep else []
        cs["days"] = []
        cs["day"] = None
        cs["trend"] = None
        cs["dtrend"] = None
        cs["rtrend"] = None
        cs["cp"] = cs["cn"] = 0.0
        cs["ok"] = {}

    def _update_trend(self, tid: str, st: dict[str, Any], cs: dict[str, Any], ch: Channel, t_h: float, norm: float,
                      w: int, flags: list[str], r: dict[str, Any], out: Outputs, defer: bool = False) -> None:
        """Window-level trend (change detection, held steps) and day-level trend (slope, forecast).

        ``defer``: this is the only window of its tractor × signal closing now, so while a close collects fits
        (``_fits``) the window trend may be fitted with the others' at the end of the close (``_flush_fits``),
        what follows from it (``_judge``) then too.
        """
        p = self.params
        span = self.part_spans[ch.signal]
        if cs["trend"] is not None and cs["base"] is not None:
            # (Before the baseline is learnt there is nothing to shift from: early steps are part of the baseline.)
            lvl, slope, _, _, _, scale, t_fit = cs["trend"]
            pred = lvl + slope * (t_h - t_fit)
            z = (norm - pred) / max(scale, p.cusum_floor * span)
            cs["cp"], cs["cn"] = cusum_step(cs["cp"], cs["cn"], z, p.cusum_k)
            if cs["cp"] > p.cusum_h or cs["cn"] > p.cusum_h:
                # A step (sensor offset, sudden wear): shift the day history by the step instead of forgetting it,
                # so a step alone never looks like a slope and a slope survives a step.
                recent = [v for _, v in cs["hist"][-3:]] + [norm]
                delta = statistics.median(recent) - pred
                days_kept = [[t, v + delta] for t, v in cs.get("days", [])]
                self._change(cs, keep=3)
                cs["days"] = days_kept
                flags.append("change")
        hist = cs["hist"]
        hist.append([_hour(t_h), norm])
        del hist[:-p.history]
        # Days: the median of a day's windows; wear shows over days, the daily cycle averages out.
        day = int(t_h // 24)
        cur = cs.setdefault("day", None)
        days = cs.setdefault("days", [])
        day_closed = False
        if cur is not None and cur[0] != day:
            summary = min(cur[1]) if ch.daily == "min" else statistics.median(cur[1])
            days.append([cur[0] * 24 + 12.0, float(summary)])
            del days[:-p.history_days]
            cur = None
            day_closed = True
        if cur is None:
            cur = [day, []]
        cur[1].append(norm)
        cs["day"] = cur
        if cs["base"] is None and len(days) >= p.min_days:
            cs["base"] = statistics.median([v for _, v in days])
        cs["since"] = cs.get("since", 0) + 1
        window_fit = len(hist) >= p.min_windows_after_change and (cs["since"] >= p.refit_windows or day_closed)
        deferred = window_fit and defer and self._fits is not None
        if window_fit:
            cs["since"] = 0
            if not deferred:
                arr = np.asarray(hist, dtype=np.float64)
                cs["trend"] = _trend_state(fit_trend(arr[:, 0], arr[:, 1]), float(arr[-1, 0]))
        if day_closed and len(days) >= p.min_days:
            darr = np.asarray(days, dtype=np.float64)
            dfit = fit_trend(darr[:, 0], darr[:, 1])
            # The last few days alone see accelerating wear sooner; the longer fit stays the default.
            recent = fit_trend(darr[-p.recent_days:, 0], darr[-p.recent_days:, 1])
            cs["dtrend"] = _trend_state(dfit, float(darr[-1, 0]))
            cs["rtrend"] = _trend_state(recent, float(darr[-1, 0]))
        judge = cs["base"] is not None and (window_fit or day_closed)
        if deferred:
            assert self._fits is not None
            self._fits.append((cs, hist, (tid, st, cs, ch, day_closed, w, r) if judge else None))
        elif judge:
            self._judge(tid, st, cs, ch, day_closed, w, r, out)

    @contextmanager
    def _fits_batched(self, out: Outputs) -> Iterator[None]:
        """A close during which ``_update_trend`` may defer window-trend fits, fitted together at its end."""
        self._fits = [] if self.batch_fits else None
        try:
            yield
            self._flush_fits(out)
        finally:
            self._fits = None

    def _flush_fits(self, out: Outputs) -> None:
        """Fit the window trends ``_update_trend`` deferred (numpy across tractors), then judge them in order."""
        fits, self._fits = self._fits or [], None
        by_length: dict[int, list[int]] = {}
        for i, (_, hist, _) in enumerate(fits):
            by_length.setdefault(len(hist), []).append(i)
        for at in by_length.values():
            arr = np.array([fits[i][1] for i in at], dtype=np.float64)
            fitted = fit_trends(arr[:, :, 0], arr[:, :, 1])
            for i, f, last in zip(at, fitted, arr[:, -1, 0].tolist(), strict=True):
                fits[i][0]["trend"] = _trend_state(f, last)
        for _, _, judge in fits:
            if judge is not None:
                self._judge(*judge, out)

    def _judge(self, tid: str, st: dict[str, Any], cs: dict[str, Any], ch: Channel, day_closed: bool, w: int,
               r: dict[str, Any], out: Outputs) -> None:
        """The window row's trend columns and the assessment of the channel's parts, from its fitted trends."""
        p = self.params
        trend = Trend(*cs["trend"][:4], int(cs["trend"][4]), cs["trend"][5]) if cs["trend"] else None
        dtrend = Trend(*cs["dtrend"][:4], int(cs["dtrend"][4]), cs["dtrend"][5]) if cs.get("dtrend") else None
        shown = dtrend or trend
        if shown is None:
            return
        r.update(level=trend.level if trend else None, slope_per_h=shown.slope, slope_lo=shown.slope_lo,
                 slope_hi=shown.slope_hi)
        for part in ch.parts:
            self._assess(tid, st, cs, part, trend, dtrend, day_closed, w + p.window_s, out)

    def _assess(self, tid: str, st: dict[str, Any], cs: dict[str, Any], part: Part, trend: Trend | None,
                dtrend: Trend | None, day_closed: bool, window_end: float, out: Outputs) -> None:
        """Health, forecast and (maybe) a wear alert for one part from its signal's trends."""
        p = self.params
        sign = -1.0 if part.direction == "falling" else 1.0
        base = cs["base"] if cs["base"] is not None else part.nominal
        if sign * (part.failure - base) <= 0:  # baseline already past failure (e.g. state began mid-failure)
            base = part.nominal

        def progress_of(level: float) -> float:
            return sign * (level - base) / (sign * (part.failure - base))

        latest = trend or dtrend
        assert latest is not None
        progress = progress_of(latest.level)
        # Order when failure is forecast within the lead time plus a margin that grows with the lead time
        # (forecasts of accelerating wear run late) but stays bounded (noisy slow signals wander).
        horizon = part.lead_time_h + p.margin_h + min((p.lead_factor - 1) * part.lead_time_h, p.max_extra_h)
        # A level held far toward failure over the recent windows (sudden-onset wear). A deviation from the
        # baseline no larger than a sensor calibration error could be one (an offset holds still): it counts only
        # while the window trend also keeps moving toward failure, as wear does after its sudden onset.
        # The held level is the median of the latest windows, not the line's end: a line through a few windows
        # either side of a days-long gap extrapolates a morning warm-up far beyond anything measured.
        recent = [v for _, v in cs["hist"][-p.min_windows_after_change:]]
        held_level = statistics.median(recent) if recent else latest.level
        held = trend is not None and progress_of(held_level) >= p.step_progress \
            and trend.n >= p.min_windows_after_change
        beyond_offset = abs(held_level - base) >= p.offset_share * abs(part.nominal)
        if held and not beyond_offset:
            tfc = forecast(trend, part.failure, part.direction)
            held = min(sign * trend.slope_lo, sign * trend.slope_hi) > 0 and tfc.expected is not None \
                and tfc.expected <= horizon
        slope_rule = False
        fc = forecast(dtrend or latest, part.failure, part.direction)
        rtrend = Trend(*cs["rtrend"][:4], int(cs["rtrend"][4]), cs["rtrend"][5]) if cs.get("rtrend") else None
        for cand in (dtrend, rtrend):
            if cand is None:
                continue
            cfc = forecast(cand, part.failure, part.direction)
            toward = min(sign * cand.slope_lo, sign * cand.slope_hi) > 0
            due = cfc.expected is not None and cfc.expected <= horizon
            if progress_of(cand.level) >= p.min_progress and toward and due:
                slope_rule = True
                fc = cfc if cand is rtrend and (fc.expected is None or (cfc.expected or 0) < fc.expected) else fc
        days = cs.get("days") or []
        # How much the day values wander on their own, as a share of the way to failure.
        wander = (dtrend.scale if dtrend else 0.0) / abs(part.failure - base)
        if day_closed and len(days) >= p.min_days and p.growth_days >= 3:
            # Accelerating wear: a line through log(progress) over the last days (exponential growth toward
            # failure) forecasts what a straight line in signal units sees late; for linear wear it errs early.
            darr = np.asarray(days[-p.growth_days:], dtype=np.float64)
            grow = fit_growth(darr[:, 0], sign * (darr[:, 1] - base) / (sign * (part.failure - base)),
                              p.growth_floor)
            # How far along counts as "on its way" scales with that wander.
            needed = max(p.growth_progress, p.growth_sigmas * wander)
            if grow is not None and grow.slope_lo > 0 and progress_of((dtrend or latest).level) >= needed:
                gfc = growth_forecast(grow)
                if gfc.expected is not None and gfc.expected <= horizon:
                    slope_rule = True
                    if fc.expected is None or gfc.expected < fc.expected:
                        fc = gfc
        # Both rules must hold on consecutive looks: held steps over window fits, slopes over day fits.
        ok = cs.setdefault("ok", {}).setdefault(part.part_id, [0, 0])
        ok[0] = ok[0] + 1 if held else 0
        if day_closed:
            ok[1] = ok[1] + 1 if slope_rule else 0
            if slope_rule and p.single_look_sigmas > 0 and wander > 0 \
                    and progress_of((dtrend or latest).level) >= p.single_look_sigmas * wander:
                ok[1] = max(ok[1], p.confirm_days)  # far beyond the day-to-day wander: one look is enough
        # A held step larger than any calibration error is wear at once (the gate already saw it held); others confirm.
        alerting = ok[0] >= (1 if beyond_offset else p.confirm) or ok[1] >= p.confirm_days
        level = (dtrend or latest).level
        beyond_warning = sign * (level - part.warning) >= 0
        status = "alert" if alerting else ("warning" if beyond_warning or held or slope_rule else "ok")
        out.health[(tid, part.part_id)] = {
            "tractor_id": tid, "part_id": part.part_id, "signal": part.signal, "level": level,
            "health": health(level, part.nominal, part.failure), "slope_per_h": (dtrend or latest).slope,
            "ttf_h": fc.expected, "ttf_lo_h": fc.earliest, "ttf_hi_h": fc.latest, "status": status,
            "as_of": _dt(window_end), "episode_id": (st["episodes"].get(part.part_id) or {}).get("id")}
        if not alerting:
            return
        episodes = st["episodes"]
        episode = episodes.get(part.part_id)
        if episode is None:
            episode = {"id": f"{tid}:{part.part_id}:{int(window_end)}", "since": window_end, "alerts": 0,
                       "last_end": 0.0}
            episodes[part.part_id] = episode
            out.health[(tid, part.part_id)]["episode_id"] = episode["id"]
        elif window_end - episode["last_end"] < p.realert_windows * p.window_s:
            return
        episode["alerts"] += 1
        episode["last_end"] = window_end
        t = dtrend or latest
        out.alerts.append({
            "alert_id": f"{episode['id']}#{episode['alerts']}",
            "episode_id": episode["id"],
            "tractor_id": tid,
            "part_id": part.part_id,
            "signal": part.signal,
            "reason": "held-step" if held and not slope_rule else "trend",
            "level": level,
            "progress": progress,
            "slope_per_h": t.slope,
            "slope_ci_per_h": [t.slope_lo, t.slope_hi],
            "ttf_h": fc.expected,
            "ttf_earliest_h": fc.earliest,
            "ttf_latest_h": fc.latest,
            "failure_threshold": part.failure,
            "lead_time_h": part.lead_time_h,
            "detected_at": _dt(window_end).isoformat(),
            "window_ids": [f"{tid}:{part.signal}:{_dt(window_end - p.window_s).isoformat()}"],
        })

    def reset_part(self, st: dict[str, Any], part_id: str) -> None:
        """Forget a part's trend baseline and alert episode (it was replaced); keep the learnt condition effects."""
        st["episodes"].pop(part_id, None)
        part = next((q for q in self.parts if q.part_id == part_id), None)
        if part is None:
            return
        cs = st["sig"].get(part.signal)
        if cs:
            self._change(cs, keep=0)
            cs["base"] = None
            cs["level"] = None


# ------------------------------------------------------------------------------------------ the function
_catalog: tuple[float, list[Part]] = (0.0, [])
_has_replacements: tuple[float, bool] = (0.0, False)


def load_parts(session: Session, max_age_s: float = 30.0) -> list[Part]:
    """Catalog parts (cached briefly: the catalog changes rarely)."""
    global _catalog
    if time.monotonic() - _catalog[0] < max_age_s and _catalog[1]:
        return _catalog[1]
    rows = session.execute(text(
        "SELECT part_id, signal, direction, nominal, warning_threshold, failure_threshold, lead_time_h, extra "
        "FROM parts ORDER BY part_id"))
    parts = [Part.from_row(row) for row in rows]
    _catalog = (time.monotonic(), parts)
    return parts


def _replacements_table(session: Session) -> bool:
    global _has_replacements
    if time.monotonic() - _has_replacements[0] < 60.0:
        return _has_replacements[1]
    present = inspect(session.get_bind()).has_table("part_replacements")
    _has_replacements = (time.monotonic(), present)
    return present


def _iso(v: Any) -> str:
    if isinstance(v, datetime):
        return (v if v.tzinfo else v.replace(tzinfo=UTC)).isoformat()
    return str(v)


# Owned by ordering (migrations): only the columns read here, untyped so the driver's values come through as they are.
_REPLACEMENTS = sa_table("part_replacements", sa_column("tractor_id", String), sa_column("part_id"),
                         sa_column("installed_at"))


def apply_replacements(session: Session, detector: Detector, states: dict[str, dict[str, Any]],
                       reset: set[str] | None = None) -> int:
    """Reset baselines of parts installed since the state last looked (table owned by ordering, read untyped).

    The ids of the tractors whose state changed are added to ``reset`` when given.
    """
    if not states or not _replacements_table(session):
        return 0
    r = _REPLACEMENTS.c
    rows = session.execute(select(r.tractor_id, r.part_id, r.installed_at)
                           .where(_among(r.tractor_id, sorted(states), session)))
    applied = 0
    for tid, part_id, installed_at in rows:
        st = states[tid]
        stamp = _iso(installed_at)
        if stamp > st["replaced"].get(part_id, ""):
            st["replaced"][part_id] = stamp
            detector.reset_part(st, part_id)
            applied += 1
            if reset is not None:
                reset.add(tid)
    return applied


def _state_key(name: str) -> str:
    """Row key of a partition's progress in ``trend_state`` (tractor ids never start with '~')."""
    key = f"~{name}"
    return key if len(key) <= 32 else "~" + hashlib.sha1(name.encode()).hexdigest()[:31]


LIVE = ("wm", "dd", "open")  # the per-sample part of a tractor's state: ``trend_state.live``, written every batch
STATE_CACHE_SIZE = Settings().trends_state_cache  # decoded states a worker keeps between batches, per database
# Per database URL: key → (token written, state, token the row held before that write (None: no row), request id
# of the invocation that wrote it).
_state_cache: dict[str, OrderedDict[str, tuple[int, dict[str, Any], int | None, str]]] = {}


def _decode(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    return value if isinstance(value, dict) else json.loads(value)


class StateStore:
    """Tractor and partition states of ``trend_state`` for one batch, through the worker's cache.

    A state is taken from the cache only while its row's ``generation`` still equals the token this process
    wrote, so a rebalance, another worker or a rolled-back batch can never hand back a stale state. Entries
    are taken out of the cache while a batch works on them and put back with their new token when saved
    (in the batch's transaction: if it rolls back, the stored token differs and the next batch reloads).
    """

    def __init__(self, session: Session, context: Context | None = None) -> None:
        self.session = session
        self.context = context
        url = session.get_bind().url.render_as_string(hide_password=False)
        self.cache = _state_cache.setdefault(url, OrderedDict())
        self.stored: set[str] = set()  # keys with a row in the table (or in the previous batch's pending commit)
        self.legacy: set[str] = set()  # rows written before 0003 (everything in ``state``)
        self.current: dict[str, int | None] = {}  # the token each row holds when this batch's writes run
        self.request_id = context.request_id if context is not None else ""
        self.hits = 0

    def load(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        """States of the keys that have a row (cache when current, else one query for the rest).

        While this worker's previous batch may still be committing (a pipelined function), a state that batch
        cached is current too while its row still holds the token that commit replaces (if the commit fails, this
        batch cannot commit either); states cached by an invocation that failed never are. Any other key waits
        for that commit before it is read, so no state is read from before it.
        """
        if not keys:
            return {}
        c = trend_state.c
        pending = self.context.pending_commit if self.context is not None else None
        tokens = dict(self.session.execute(select(c.tractor_id, c.generation)
                                           .where(_among(c.tractor_id, keys, self.session))).all())
        out: dict[str, dict[str, Any]] = {}
        missing: list[str] = []
        for k in keys:
            hit = self.cache.pop(k, None)
            token = tokens.get(k)
            if hit is not None and ((token and hit[0] == token) or (pending and hit[3] == pending
                                                                     and token == hit[2])):
                out[k] = hit[1]
                self.stored.add(k)
                self.current[k] = hit[0]
            elif k in tokens or pending:
                missing.append(k)
        if missing and pending:
            assert self.context is not None
            self.context.wait_for_commit()
            self.context.pending_commit = None
            tokens = dict(self.session.execute(select(c.tractor_id, c.generation)
                                               .where(_among(c.tractor_id, missing, self.session))).all())
            missing = [k for k in missing if k in tokens]
        for k in missing:
            self.stored.add(k)
            self.current[k] = tokens[k]
        self.hits += len(out)
        if missing:
            rows = self.session.execute(select(c.tractor_id, c.state, c.live)
                                        .where(_among(c.tractor_id, missing, self.session)))
            for k, state, live in rows:
                st = _decode(state) or {}
                extra = _decode(live)
                if extra is None:
                    self.legacy.add(k)
                else:
                    st.update(extra)
                out[k] = st
        return out

    def save(self, states: dict[str, dict[str, Any]], slow_changed: set[str]) -> None:
        """Write the states: ``live`` always, ``state`` too for new, legacy and ``slow_changed`` keys.

        The writes go through ``context.defer`` when there is a context (in the background for a pipelined
        function); the states are encoded here, so the writes use nothing the next batch changes.
        """
        write = self.prepare(states, slow_changed)
        if self.context is not None:
            self.context.defer(write)
        else:
            write(self.session)

    def prepare(self, states: dict[str, dict[str, Any]], slow_changed: set[str]) -> Callable[[Session], None]:
        """Cache the states under new tokens and return the writes that store them (run in this batch's transaction)."""
        now = datetime.now(UTC)
        fresh: list[dict[str, Any]] = []
        full: list[dict[str, Any]] = []
        live: list[dict[str, Any]] = []
        for k, st in states.items():
            token = secrets.randbits(62) + 1
            row = {"live": {f: st[f] for f in LIVE if f in st}, "generation": token, "updated_at": now}
            if k not in self.stored or k in self.legacy or k in slow_changed:
                row["state"] = {f: v for f, v in st.items() if f not in LIVE}
                if k in self.stored:
                    full.append({"key": k, **row})
                else:
                    fresh.append({"tractor_id": k, **row})
            else:
                live.append({"key": k, **row})
            if STATE_CACHE_SIZE > 0:
                self.cache[k] = (token, st, self.current.get(k), self.request_id)
        self.stored.update(states)
        while len(self.cache) > STATE_CACHE_SIZE:
            self.cache.popitem(last=False)
        postgres = self.session.get_bind().dialect.name == "postgresql"
        if postgres:  # encoded now: the states change while a pipelined batch's writes run
            new_rows = [(r["tractor_id"], encode_state(r["state"]), encode_state(r["live"]), r["generation"],
                         r["updated_at"]) for r in fresh]
            staged = [(r["key"], None if r.get("state") is None else encode_state(r["state"]),
                       encode_state(r["live"]), r["generation"], r["updated_at"]) for r in full + live]

        def write(session: Session) -> None:
            c = trend_state.c
            if postgres:
                if new_rows:
                    with _dbapi(session).cursor() as cur:
                        _copy_states(cur, "trend_state", new_rows)
                _update_states_by_copy(session, staged)
                return
            _execute_many(session, "state-insert", insert(trend_state), fresh)
            for rows, cols in ((full, ("state", "live", "generation", "updated_at")),
                               (live, ("live", "generation", "updated_at"))):
                if rows:  # one executemany, not a round trip per tractor
                    _execute_many(session, f"state-update-{len(cols)}", update(trend_state).where(
                        c.tractor_id == bindparam("key")).values({col: bindparam(col) for col in cols}), rows)

        return write


def _among(column: Any, keys: list[str], session: Session) -> Any:
    """``column IN keys``; on PostgreSQL as ``= ANY(array)``: one parameter, not a thousand bound and compiled."""
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam("among", keys, type_=ARRAY(String)))
    return column.in_(keys)


def _dbapi(session: Session) -> Any:
    """The driver connection under a session's transaction (for COPY, which SQLAlchemy does not expose)."""
    dbapi = session.connection().connection.dbapi_connection
    assert dbapi is not None
    return dbapi


def _create_stage(cur: Any) -> None:
    """Create this connection's staging table for ``_update_states_by_copy`` unless it has one.

    The UPDATE copies a staged value as it is stored, compressed or not, so the staged JSON is compressed once,
    here, with the method ``trend_state`` uses (lz4 since migration 0004): the UPDATE then only moves the
    compressed bytes (half the UPDATE's time of compressing there, 1,000 full states a batch). Where lz4 is
    unavailable (``trend_state`` then keeps the default) the staged values are stored uncompressed and the UPDATE
    compresses them with that default, once. Looked up every time: a rolled-back batch takes the table it
    created with it.
    """
    cur.execute("SELECT to_regclass('pg_temp.trend_state_stage') IS NOT NULL")
    row = cur.fetchone()
    if row and row[0]:
        return
    columns = "(tractor_id varchar(32), state json{c}, live json{c}, generation bigint, updated_at timestamptz)"
    cur.execute(f"""DO $$ BEGIN
        EXECUTE 'CREATE TEMP TABLE trend_state_stage {columns.format(c=" COMPRESSION lz4")}';
    EXCEPTION WHEN feature_not_supported OR syntax_error THEN
        EXECUTE 'CREATE TEMP TABLE trend_state_stage {columns.format(c="")}';
        ALTER TABLE trend_state_stage ALTER COLUMN state SET STORAGE EXTERNAL, ALTER COLUMN live SET STORAGE EXTERNAL;
    END $$""")


def _copy_states(cur: Any, table: str, rows: list[tuple[Any, ...]]) -> None:
    """Binary COPY of encoded state rows (key, state JSON or None, live JSON, generation, updated_at)."""
    with cur.copy(f"COPY {table} (tractor_id, state, live, generation, updated_at) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["text", "text", "text", "int8", "timestamptz"])  # json's binary form is its text
        for row in rows:
            copy.write_row(row)


def _update_states_by_copy(session: Session, rows: list[tuple[Any, ...]]) -> None:
    """``UPDATE trend_state`` for many rows on PostgreSQL: a binary COPY into a staging table, then one UPDATE.

    Rows are (key, state JSON or None to keep the stored one, live JSON, generation, updated_at). The staging
    table is temporary (this connection only) and emptied after use, so the rows never outlive the batch's
    transaction.
    """
    if not rows:
        return
    with _dbapi(session).cursor() as cur:
        _create_stage(cur)
        _copy_states(cur, "trend_state_stage", rows)
        cur.execute("UPDATE trend_state AS t SET state = coalesce(s.state, t.state), live = s.live,"
                    " generation = s.generation, updated_at = s.updated_at"
                    " FROM trend_state_stage AS s WHERE t.tractor_id = s.tractor_id")
        cur.execute("TRUNCATE trend_state_stage")


_compiled: dict[tuple[str, str], tuple[str, tuple[str, ...], list[Any]]] = {}


def _utc_memo(proc: Any) -> Any:
    """``proc`` remembering its result per UTC datetime (equal datetimes in other zones print differently)."""
    memo: dict[datetime, Any] = {}

    def run(value: Any) -> Any:
        if type(value) is not datetime or value.tzinfo is not UTC:
            return proc(value)
        out = memo.get(value)
        if out is None:
            if len(memo) >= 4096:
                memo.clear()
            out = memo[value] = proc(value)
        return out

    return run


_BINARY_TYPES = {"String": "text", "Integer": "int4", "BigInteger": "int8", "Float": "float8", "Boolean": "bool"}


def _binary_type(column: Any) -> str | None:
    """PostgreSQL type psycopg dumps a column's values as in a binary COPY (None: no binary form here)."""
    kind = type(column.type).__name__
    if kind == "DateTime":
        return "timestamptz" if column.type.timezone else "timestamp"
    return _BINARY_TYPES.get(kind)


def _copy(session: Session, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert plain-typed rows into a PostgreSQL table with ``COPY … FROM STDIN``, in the session's transaction.

    An ``executemany`` of thousands of trend rows spent most of a batch building parameters in SQLAlchemy and in
    psycopg's pipeline; COPY streams the values. The binary format, where every column has one, skips formatting
    floats and timestamps as text (7× cheaper per row). Constraint violations fail the batch as an INSERT would.
    """
    from psycopg import sql

    cols = list(rows[0])
    types = [_binary_type(table.c[c]) for c in cols]
    binary = all(types)
    query = sql.SQL("COPY {} ({}) FROM STDIN" + (" (FORMAT BINARY)" if binary else "")).format(
        sql.Identifier(table.name), sql.SQL(", ").join(map(sql.Identifier, cols)))
    get = itemgetter(*cols)
    with _dbapi(session).cursor() as cur, cur.copy(query) as copy:
        if binary:
            copy.set_types(types)
        for row in rows:
            copy.write_row(get(row))


def _execute_many(session: Session, key: str, stmt: Any, rows: list[dict[str, Any]], copy: bool = False) -> None:
    """Run ``stmt`` once per row; on SQLite straight through the driver's executemany, on PostgreSQL by COPY.

    ``copy`` marks an INSERT whose values need no type processing (numbers, text, aware datetimes): on
    PostgreSQL those rows are streamed into the statement's table with COPY.

    SQLAlchemy builds and type-processes a parameter dict per row, which costs more than SQLite's own work for the
    thousands of rows a window close writes. On SQLite the statement is compiled once (per ``key``) and each row's
    values go through the same column-type bind processors SQLAlchemy would apply. Rows must share their keys.
    """
    if not rows:
        return
    dialect = session.get_bind().dialect
    if dialect.name == "postgresql" and copy:
        _copy(session, stmt.table, rows)
        return
    if dialect.name != "sqlite":
        session.execute(stmt, rows)
        return
    entry = _compiled.get((key, dialect.name))
    if entry is None:
        compiled = stmt.compile(dialect=dialect, column_keys=list(rows[0]))
        names = tuple(compiled.positiontup or ())
        procs = []
        for name in names:
            impl = compiled.binds[name].type.dialect_impl(dialect)
            proc = impl.bind_processor(dialect)
            if proc is not None and isinstance(impl, DateTime):  # a batch's rows share a few window bounds
                proc = _utc_memo(proc)
            procs.append(proc)
        entry = _compiled[(key, dialect.name)] = (compiled.string, names, procs)
    sql, names, procs = entry
    if not set(names) <= rows[0].keys():
        session.execute(stmt, rows)
        return
    get = itemgetter(*names)
    if len(names) == 1:
        params: list[Any] = [(get(row),) for row in rows]
    else:
        params = [get(row) for row in rows]
    typed = [(i, proc) for i, proc in enumerate(procs) if proc is not None]
    if typed:
        for r, values in enumerate(params):
            values = list(values)
            for i, proc in typed:
                values[i] = proc(values[i])
            params[r] = tuple(values)
    session.connection().exec_driver_sql(sql, params)


def _upsert_health(session: Session, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        stmt = dialect_insert(part_health)
        stmt = stmt.on_conflict_do_update(index_elements=["tractor_id", "part_id"],
                                          set_={c: stmt.excluded[c] for c in rows[0]
                                                if c not in ("tractor_id", "part_id")})
        session.execute(stmt, rows)
        return
    for row in rows:  # any other database: plain update-or-insert
        keys = (part_health.c.tractor_id == row["tractor_id"]) & (part_health.c.part_id == row["part_id"])
        if session.execute(update(part_health).where(keys).values(**row)).rowcount == 0:  # type: ignore[attr-defined]
            session.execute(insert(part_health).values(**row))


_detectors: dict[tuple[int, Params], Detector] = {}


def _detector(parts: list[Part], params: Params) -> Detector:
    """The detector for a catalog and params (kept while both stay the same objects/values)."""
    key = (id(parts), params)
    det = _detectors.get(key)
    if det is None or det.parts is not parts:
        _detectors.clear()
        det = _detectors[key] = Detector(parts, params)
    return det


def handler(event: dict[str, Any], context: Context) -> None:
    """Update windows and trends for a batch of telemetry; write trend rows and part health; emit wear alerts."""
    session = context.session
    assert session is not None, "trends.detect needs a transactional function"
    params = Params.from_context(context.params)
    records = [r for recs in event["records"].values() for r in recs]
    frame = flatten(records)
    if frame.empty:
        return
    detector = _detector(load_parts(session), params)
    tids = sorted(frame["tractor_id"].unique().tolist())
    part_keys = {_state_key(p): p for p in frame["partition"].unique().tolist()}
    store = StateStore(session, context)
    loaded = store.load(tids + list(part_keys))
    states = {t: loaded.get(t) or new_state() for t in tids}
    partitions = {p: loaded.get(k) or {"wm": 0.0, "open": {}} for k, p in part_keys.items()}
    reset: set[str] = set()
    replaced = apply_replacements(session, detector, states, reset)

    def load_state(tid: str) -> dict[str, Any] | None:
        return store.load([tid]).get(tid)

    out = detector.process(frame, states, partitions, load_state)
    windows, healths = out.windows, list(out.health.values())

    def write_rows(s: Session) -> None:
        _execute_many(s, "windows-insert", insert(trend_windows), windows, copy=True)
        _upsert_health(s, healths)

    context.defer(write_rows)
    for alert in out.alerts:
        context.emit(ALERT_TOPIC, alert["tractor_id"], alert)
    # Only closing a window (trends, regression, episodes) or a replacement changes a state's slow part.
    slow = reset | {w["tractor_id"] for w in out.windows}
    store.save(states, slow)
    part_states = {_state_key(p): ps for p, ps in partitions.items()}
    store.save(part_states, set(part_states))
    for name, value in out.counters.items():
        context.metrics.incr(name, value)
    context.metrics.incr("windows_closed", len(out.windows))
    context.metrics.incr("alerts", len(out.alerts))
    context.metrics.incr("state_cache_hits", store.hits)
    if replaced:
        context.metrics.incr("replacements_applied", replaced)

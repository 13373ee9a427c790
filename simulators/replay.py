"""Replays a recorded CSV of timestamped readings as tractor telemetry, through a column mapping file (TOML).

The mapping names the entity-id column, the time column (a timestamp, or a cycle index with a period, as in
public run-to-failure data sets), and for each contract signal the column holding it with a unit conversion.
A bad reading (empty, not a number, outside the contract's plausible range after conversion) is left out of
its sample and counted; the row's other readings still go. docs/simulator.md shows an example mapping.
"""

from __future__ import annotations

import csv
import json
import math
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ingest.contract import SIGNALS, TRACTOR_ID_RE
from ingest.validate import format_ts, parse_ts
from simulators.scenario import validation_problem

# Unit conversions into the contract's units: (from, to) -> (scale, offset), value_to = value * scale + offset.
CONVERSIONS: dict[tuple[str, str], tuple[float, float]] = {
    ("psi", "kPa"): (6.894757, 0.0),
    ("bar", "kPa"): (100.0, 0.0),
    ("mbar", "kPa"): (0.1, 0.0),
    ("Pa", "kPa"): (0.001, 0.0),
    ("inH2O", "kPa"): (0.249089, 0.0),
    ("psi", "bar"): (0.0689476, 0.0),
    ("kPa", "bar"): (0.01, 0.0),
    ("MPa", "bar"): (10.0, 0.0),
    ("degF", "degC"): (5.0 / 9.0, -32.0 * 5.0 / 9.0),
    ("degR", "degC"): (5.0 / 9.0, -273.15),
    ("K", "degC"): (1.0, -273.15),
    ("in/s", "mm/s"): (25.4, 0.0),
    ("m/s", "mm/s"): (1000.0, 0.0),
    ("gal/h", "L/h"): (3.785411784, 0.0),
    ("kg/h", "L/h"): (1.0 / 0.832, 0.0),  # diesel, 0.832 kg/L
    ("pps", "L/h"): (1.0 / 0.832 * 3600 * 0.4536, 0.0),  # pounds of diesel per second
    ("fraction", "%"): (100.0, 0.0),
    ("mV", "V"): (0.001, 0.0),
}


class ReplayError(ValueError):
    """A mapping or CSV that cannot be replayed, with a message saying what to fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EntityMap(_Strict):
    """Which column identifies the tractor, and how its value becomes a tractor id."""

    column: str
    format: str = "{}"  # e.g. "T{:05d}" for numeric unit numbers (the value is an int when it looks like one)


class TimeMap(_Strict):
    """The time column: an ISO-8601/epoch timestamp, or a cycle index times ``period_s``."""

    column: str
    kind: Literal["timestamp", "epoch_s", "epoch_ms", "cycle"] = "timestamp"
    period_s: Annotated[float, Field(gt=0)] | None = None
    start: datetime | None = None  # cycle 0 (cycle) or where the first timestamp moves to (shift)
    shift_to_now: bool = False  # move every timestamp so the latest one is now (old public data sets)

    @model_validator(mode="after")
    def _period(self) -> TimeMap:
        if self.kind == "cycle" and self.period_s is None:
            raise ValueError("a cycle time column needs period_s (seconds per cycle)")
        return self


class SignalMap(_Strict):
    """One contract signal: its column and how to convert it (``unit`` or ``scale``/``offset``)."""

    column: str
    unit: str | None = None
    scale: float = 1.0
    offset: float = 0.0


class HoursMap(_Strict):
    """Engine hours: a column, or counted from the entity's first row (plus ``start``)."""

    column: str | None = None
    start: Annotated[float, Field(ge=0)] = 0.0


class CsvFormat(_Strict):
    """How the file is laid out."""

    delimiter: str = ","  # "whitespace" for space-separated files (e.g. NASA C-MAPSS)
    header: bool = True
    columns: list[str] | None = None  # names when the file has no header row


class Mapping(_Strict):
    """A CSV → telemetry mapping file."""

    entity: EntityMap
    time: TimeMap
    signals: dict[str, SignalMap]
    engine_hours: HoursMap = Field(default_factory=HoursMap)
    csv: CsvFormat = Field(default_factory=CsvFormat)
    samples_per_message: Annotated[int, Field(ge=1, le=500)] = 1

    @model_validator(mode="after")
    def _known(self) -> Mapping:
        if not self.signals:
            raise ValueError("map at least one signal under [signals.<name>]")
        for name, sig in self.signals.items():
            if name not in SIGNALS:
                raise ValueError(f"signals.{name}: not a contract signal; one of {', '.join(SIGNALS)}")
            if sig.unit is not None and sig.unit != SIGNALS[name].unit and \
                    (sig.unit, SIGNALS[name].unit) not in CONVERSIONS:
                known = sorted(f for f, t in CONVERSIONS if t == SIGNALS[name].unit)
                raise ValueError(f"signals.{name}: no conversion from {sig.unit!r} to {SIGNALS[name].unit}; "
                                 f"known: {', '.join(known) or 'none'} (or give scale and offset)")
        if not self.csv.header and not self.csv.columns:
            raise ValueError("csv.header = false needs csv.columns (the column names)")
        return self

    def converter(self, name: str) -> tuple[float, float]:
        """(scale, offset) turning the column's value into the signal's contract unit."""
        sig = self.signals[name]
        if sig.unit is None or sig.unit == SIGNALS[name].unit:
            return sig.scale, sig.offset
        scale, offset = CONVERSIONS[(sig.unit, SIGNALS[name].unit)]
        return scale * sig.scale, offset * sig.scale + sig.offset


def load_mapping(path: Path) -> Mapping:
    """A mapping file, validated; ReplayError says what is wrong."""
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ReplayError(f"cannot read mapping file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ReplayError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return Mapping.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(validation_problem(e) for e in exc.errors())
        raise ReplayError(f"{path}: invalid mapping: {problems}") from exc


@dataclass
class ReplayStats:
    """What a replay read and produced."""

    rows: int = 0
    samples: int = 0
    messages: int = 0
    entities: set[str] = field(default_factory=set)
    skipped_rows: int = 0
    skipped_readings: int = 0
    problems: list[str] = field(default_factory=list)  # the first few, for the user

    def problem(self, text: str) -> None:
        """Remember a problem (the first 20 are kept)."""
        if len(self.problems) < 20:
            self.problems.append(text)


def _rows(path: Path, fmt: CsvFormat) -> Iterator[tuple[int, dict[str, str]]]:
    try:
        fh = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise ReplayError(f"cannot read {path}: {exc.strerror or exc}") from exc
    with fh:
        if fmt.delimiter == "whitespace":
            lines: Iterator[list[str]] = (line.split() for line in fh)
        else:
            lines = csv.reader(fh, delimiter=fmt.delimiter)
        names = fmt.columns
        for lineno, cells in enumerate(lines, start=1):
            if not cells:
                continue
            if names is None:
                names = [c.strip() for c in cells]
                continue
            yield lineno, dict(zip(names, (c.strip() for c in cells), strict=False))


def _entity(raw: str, fmt: str) -> str:
    value: object = raw
    try:
        as_float = float(raw)
        if as_float.is_integer():
            value = int(as_float)
    except ValueError:
        pass
    try:
        return fmt.format(value)
    except (ValueError, IndexError, KeyError) as exc:
        raise ValueError(f"entity format {fmt!r} does not fit {raw!r}: {exc}") from exc


class Replay:
    """Turns CSV rows into v1 messages per entity, in file order."""

    def __init__(self, path: Path, mapping: Mapping, now: datetime | None = None) -> None:
        self.path, self.m = path, mapping
        self.now = now or datetime.now(UTC)
        self.stats = ReplayStats()
        self._conv = {name: mapping.converter(name) for name in mapping.signals}
        self._shift = timedelta(0)
        self._start = mapping.time.start
        self._check_columns()
        if mapping.time.kind == "cycle" and self._start is None:
            last = max((self._cycle(r) for _, r in _rows(path, mapping.csv) if self._cycle_ok(r)), default=0.0)
            self._start = self.now - timedelta(seconds=last * (mapping.time.period_s or 0.0))
        elif mapping.time.kind != "cycle" and (mapping.time.shift_to_now or mapping.time.start):
            times = [t for _, r in _rows(path, mapping.csv) if (t := self._raw_time(r)) is not None]
            if times:
                self._shift = (self.now - max(times)) if mapping.time.shift_to_now else (
                    mapping.time.start.astimezone(UTC) - min(times))  # type: ignore[union-attr]

    def _check_columns(self) -> None:
        first = next(_rows(self.path, self.m.csv), None)
        if first is None:
            raise ReplayError(f"{self.path}: no data rows")
        wanted = [self.m.entity.column, self.m.time.column, *(s.column for s in self.m.signals.values())]
        if self.m.engine_hours.column:
            wanted.append(self.m.engine_hours.column)
        missing = [c for c in wanted if c not in first[1]]
        if missing:
            raise ReplayError(f"{self.path}: mapped columns not in the file: {', '.join(missing)}; "
                              f"the file has: {', '.join(first[1])}")

    def _cycle(self, row: dict[str, str]) -> float:
        return float(row[self.m.time.column])

    def _cycle_ok(self, row: dict[str, str]) -> bool:
        try:
            return math.isfinite(self._cycle(row))
        except (ValueError, KeyError):
            return False

    def _raw_time(self, row: dict[str, str]) -> datetime | None:
        raw = row.get(self.m.time.column, "")
        kind = self.m.time.kind
        try:
            if kind == "cycle":
                c = self._cycle(row)
                if not math.isfinite(c):
                    return None
                return self._start + timedelta(seconds=c * (self.m.time.period_s or 0.0))  # type: ignore[operator]
            if kind in ("epoch_s", "epoch_ms"):
                return datetime.fromtimestamp(float(raw) / (1000.0 if kind == "epoch_ms" else 1.0), UTC)
        except (ValueError, OverflowError, OSError):
            return None
        for candidate in (raw, raw + "Z"):  # timestamps without a zone are taken as UTC
            ts = parse_ts(candidate.replace(" ", "T", 1))
            if ts is not None:
                return ts
        return None

    def samples(self) -> Iterator[tuple[str, dict[str, object]]]:
        """(tractor id, sample) per usable row, in file order."""
        first_ts: dict[str, datetime] = {}
        hours_col = self.m.engine_hours.column
        for lineno, row in _rows(self.path, self.m.csv):
            self.stats.rows += 1
            try:
                tid = _entity(row.get(self.m.entity.column, ""), self.m.entity.format)
            except ValueError as exc:
                self.stats.skipped_rows += 1
                self.stats.problem(f"line {lineno}: {exc}")
                continue
            ts = self._raw_time(row)
            if not TRACTOR_ID_RE.match(tid) or ts is None:
                self.stats.skipped_rows += 1
                self.stats.problem(f"line {lineno}: no usable entity or time")
                continue
            ts += self._shift
            readings: dict[str, float] = {}
            for name, sig in self.m.signals.items():
                raw = row.get(sig.column, "")
                try:
                    value = float(raw)
                except ValueError:
                    value = math.nan
                scale, offset = self._conv[name]
                value = value * scale + offset
                spec = SIGNALS[name]
                if not math.isfinite(value) or not spec.low <= value <= spec.high:
                    self.stats.skipped_readings += 1
                    self.stats.problem(f"line {lineno}: {name} from {sig.column}={raw!r} is not a plausible "
                                       f"{spec.unit} value")
                    continue
                readings[name] = round(value, 4)
            if not readings:
                self.stats.skipped_rows += 1
                continue
            first = first_ts.setdefault(tid, ts)
            hours = self.m.engine_hours.start + (ts - first).total_seconds() / 3600.0
            if hours_col:
                try:
                    hours = float(row.get(hours_col, ""))
                except ValueError:
                    pass
            if not (math.isfinite(hours) and 0 <= hours <= 1_000_000):
                hours = self.m.engine_hours.start
            self.stats.entities.add(tid)
            yield tid, {"ts": format_ts(ts), "engine_hours": round(hours, 3), "readings": readings}

    def messages(self) -> Iterator[tuple[str, bytes]]:
        """(tractor id, v1 payload) with ``samples_per_message`` samples each, per entity in file order."""
        seq: dict[str, int] = {}
        pending: dict[str, list[dict[str, object]]] = {}
        for tid, sample in self.samples():
            batch = pending.setdefault(tid, [])
            batch.append(sample)
            if len(batch) >= self.m.samples_per_message:
                yield self._message(tid, pending.pop(tid), seq)
        for tid, batch in pending.items():
            yield self._message(tid, batch, seq)

    def _message(self, tid: str, batch: list[dict[str, object]], seq: dict[str, int]) -> tuple[str, bytes]:
        seq[tid] = seq.get(tid, 0) + 1
        self.stats.samples += len(batch)
        self.stats.messages += 1
        doc = {"v": 1, "tractor_id": tid, "seq": seq[tid], "samples": batch}
        return tid, json.dumps(doc, separators=(",", ":")).encode()

"""Scenario files (TOML): fleet size, work schedule, wear and fault mix, network behaviour; built into a Fleet."""

from __future__ import annotations

import math
import tomllib
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from simulators.faults import FAULT_KINDS, VALID_FAULT_KINDS, Fault
from simulators.fleet import DAY, Fleet, Network, start_for
from simulators.model import SIGNAL_ORDER, WEAR_SIGNALS, Climate, PartSpec, Schedule, parts_from_catalog
from simulators.wear import WEAR_KINDS, Wear

SCENARIO_DIR = Path(__file__).with_name("scenario_files")
HOUR = 3_600.0

WearKind = Literal["linear", "exponential", "sudden"]
FaultKind = Literal["spike", "stuck", "dropout", "offset", "noise", "out_of_range"]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class ScenarioError(ValueError):
    """A scenario that cannot be loaded or built, with a message saying what to fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _range(lo: float, hi: float) -> Any:
    return Field(default=(lo, hi), description="[low, high]")


class _Ranges(_Strict):
    @model_validator(mode="after")
    def _ordered(self) -> _Ranges:
        for name, value in self:
            if isinstance(value, tuple) and len(value) == 2 and value[0] > value[1]:
                raise ValueError(f"{name}: low {value[0]} is above high {value[1]}")
        return self


class ScheduleConfig(_Ranges):
    """How tractors work (see simulators.model.Schedule)."""

    work_day_probability: Fraction = 0.85
    sunday_work_probability: Fraction = 0.15
    start_hour: tuple[Annotated[float, Field(ge=0, le=24)], Annotated[float, Field(ge=0, le=24)]] = _range(6.0, 8.5)
    end_hour: tuple[Annotated[float, Field(ge=0, le=24)], Annotated[float, Field(ge=0, le=24)]] = _range(16.5, 20.0)
    lunch_engine_off_probability: Fraction = 0.5
    field_rpm: tuple[Annotated[float, Field(ge=900, le=2600)], Annotated[float, Field(ge=900, le=2600)]] = \
        _range(1750.0, 2050.0)
    field_load: tuple[Annotated[float, Field(ge=10, le=100)], Annotated[float, Field(ge=10, le=100)]] = \
        _range(50.0, 80.0)

    @model_validator(mode="after")
    def _day(self) -> ScheduleConfig:
        if self.start_hour[1] + 2 > self.end_hour[0]:
            raise ValueError("start_hour must end at least 2 hours before end_hour begins")
        return self


class ClimateConfig(_Ranges):
    """Ambient temperature (see simulators.model.Climate)."""

    mean_c: Annotated[float, Field(ge=-30, le=40)] = 14.0
    mean_spread_c: Annotated[float, Field(ge=0, le=15)] = 5.0
    daily_amplitude_c: tuple[Annotated[float, Field(ge=0, le=20)], Annotated[float, Field(ge=0, le=20)]] = \
        _range(4.0, 8.0)
    weather_sigma_c: Annotated[float, Field(ge=0, le=15)] = 3.0
    weather_tau_days: Annotated[float, Field(gt=0, le=30)] = 1.0


class ModelConfig(_Ranges):
    """A tractor model in the fleet: its share and how hard it is driven in the field."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    share: Annotated[float, Field(gt=0)] = 1.0
    field_rpm: tuple[Annotated[float, Field(ge=900, le=2600)], Annotated[float, Field(ge=900, le=2600)]] | None = None
    field_load: tuple[Annotated[float, Field(ge=10, le=100)], Annotated[float, Field(ge=10, le=100)]] | None = None


class WearEntry(_Strict):
    """Explicit wear: tractor number ``tractor`` (1-based) or the first ``first`` tractors."""

    tractor: Annotated[int, Field(ge=1)] | None = None
    first: Annotated[int, Field(ge=0)] | None = None
    part: str
    kind: WearKind = "linear"
    onset_day: Annotated[float, Field(ge=0)] = 1.0
    failure_day: Annotated[float, Field(gt=0)] | None = None
    failure_after_end_days: float | None = None

    @model_validator(mode="after")
    def _one_of(self) -> WearEntry:
        if (self.tractor is None) == (self.first is None):
            raise ValueError("give exactly one of tractor or first")
        if (self.failure_day is None) == (self.failure_after_end_days is None):
            raise ValueError("give exactly one of failure_day or failure_after_end_days")
        return self


class WearMix(_Ranges):
    """Random wear: ``fraction`` of the tractors get one worn part each, covering every part × kind in turn."""

    fraction: Fraction = 0.0
    kinds: list[WearKind] = Field(default_factory=lambda: list(WEAR_KINDS))
    parts: list[str] | None = None
    failure_at: tuple[float, float] = _range(0.3, 1.2)  # failure time as a fraction of the run length
    linear_days: tuple[float, float] = _range(20.0, 90.0)
    exponential_days: tuple[float, float] = _range(20.0, 90.0)
    sudden_days: tuple[float, float] = _range(2.0, 10.0)


class FaultEntry(_Strict):
    """Explicit sensor fault on tractor number ``tractor`` (1-based)."""

    tractor: Annotated[int, Field(ge=1)]
    signal: str
    kind: FaultKind
    start_day: Annotated[float, Field(ge=0)]
    duration_hours: Annotated[float, Field(ge=0)] = 0.0
    magnitude: float | None = None


class FaultMix(_Ranges):
    """Random sensor faults: ``fraction`` of the tractors get ``per_tractor`` faults each."""

    fraction: Fraction = 0.0
    per_tractor: Annotated[int, Field(ge=1, le=100)] = 1
    kinds: list[FaultKind] = Field(default_factory=lambda: list(VALID_FAULT_KINDS))
    signals: list[str] = Field(default_factory=lambda: list(WEAR_SIGNALS))
    stuck_hours: tuple[float, float] = _range(2.0, 48.0)
    dropout_hours: tuple[float, float] = _range(2.0, 72.0)
    offset_hours: tuple[float, float] = _range(48.0, 720.0)
    noise_hours: tuple[float, float] = _range(2.0, 24.0)


class NetworkConfig(_Ranges):
    """Coverage gaps (store-and-forward), duplicates, out-of-order delivery and clock skew."""

    samples_per_message: Annotated[int, Field(ge=1, le=500)] = 1
    gap_tractor_fraction: Fraction = 0.0
    gaps_per_tractor: Annotated[float, Field(ge=0, le=100)] = 1.0
    gap_hours: tuple[float, float] = _range(1.0, 24.0)
    duplicate_probability: Fraction = 0.0
    reorder_probability: Fraction = 0.0
    clock_skew_fraction: Fraction = 0.0
    clock_skew_s: tuple[Annotated[float, Field(ge=-86400)], Annotated[float, Field(le=120)]] = _range(-900.0, 120.0)


class Degrading(_Strict):
    """The demo's knob: the first ``count`` tractors' ``part`` wears so it fails after the run (``--degrading``)."""

    count: Annotated[int, Field(ge=0)] = 1
    part: str = "OIL-PUMP"
    kind: WearKind = "linear"
    onset_day: Annotated[float, Field(ge=0)] = 1.0
    failure_after_end_days: float = 1.0


class ScenarioFile(_Strict):
    """A fleet scenario as written in a TOML file."""

    name: str
    description: str = ""
    tractors: Annotated[int, Field(ge=1, le=1_000_000)]
    days: Annotated[float, Field(gt=0, le=3650)]
    period_s: Annotated[float, Field(ge=0.1, le=86400)] = 600.0
    seed: int = 7
    start: datetime | None = None
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    climate: ClimateConfig = Field(default_factory=ClimateConfig)
    models: list[ModelConfig] = Field(default_factory=list)
    degrading: Degrading | None = None
    wear: list[WearEntry] = Field(default_factory=list)
    wear_mix: WearMix = Field(default_factory=WearMix)
    faults: list[FaultEntry] = Field(default_factory=list)
    fault_mix: FaultMix = Field(default_factory=FaultMix)
    network: NetworkConfig = Field(default_factory=NetworkConfig)


def validation_problem(e: Any) -> str:
    """One pydantic error as ``field.path: message (got value)``."""
    where = ".".join(str(p) for p in e["loc"]) or "(top)"
    value = e.get("input")
    got = f" (got {value!r})" if isinstance(value, str | int | float) and len(repr(value)) < 60 else ""
    return f"{where}: {e['msg']}{got}"


def shipped() -> list[str]:
    """Names of the scenarios shipped with the package."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def load(name_or_path: str | Path) -> ScenarioFile:
    """A scenario by shipped name (``mixed-wear``) or TOML file path; ScenarioError says what is wrong."""
    text = str(name_or_path)
    if isinstance(name_or_path, str) and not text.endswith(".toml"):
        # a bare name picks a shipped scenario; anything else must be a path to a .toml file
        if text not in shipped():
            shown = text if len(text) <= 80 else text[:80] + "…"
            raise ScenarioError(f"unknown scenario {shown!r}; shipped: {', '.join(shipped())} "
                                "(or give a path to a .toml file)")
        path = SCENARIO_DIR / f"{text}.toml"
    else:
        path = Path(name_or_path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from exc
    except (OSError, ValueError) as exc:  # ValueError: NUL bytes in a path, undecodable text
        raise ScenarioError(f"cannot read scenario file {str(path)[:200]}: "
                            f"{getattr(exc, 'strerror', None) or exc}") from exc
    doc.setdefault("name", path.stem)
    try:
        return ScenarioFile.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(validation_problem(e) for e in exc.errors())
        raise ScenarioError(f"{path}: invalid scenario: {problems}") from exc


def _check_part(parts: dict[str, PartSpec], part: str, where: str) -> PartSpec:
    if part not in parts:
        raise ScenarioError(f"{where}: unknown part {part!r}; catalog parts: {', '.join(sorted(parts))}")
    return parts[part]


def _check_signal(signal: str, where: str) -> None:
    if signal not in SIGNAL_ORDER:
        raise ScenarioError(f"{where}: unknown signal {signal!r}; signals: {', '.join(SIGNAL_ORDER)}")


def checked_parts(catalog: list[dict[str, Any]] | None) -> dict[str, PartSpec]:
    """Part specs from catalog rows, or ScenarioError naming the part the simulator cannot model."""
    try:
        parts = parts_from_catalog(catalog)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ScenarioError(f"catalog: a part lacks a usable part_id, signal, direction, nominal or "
                            f"failure_threshold ({type(exc).__name__}: {exc})") from exc
    for p in parts.values():
        if p.signal not in WEAR_SIGNALS:
            raise ScenarioError(f"catalog: part {p.part_id}: the simulator models no wear signal {p.signal!r}; "
                                f"modelled: {', '.join(WEAR_SIGNALS)}")
        if not (math.isfinite(p.nominal) and math.isfinite(p.failure)) or p.direction not in ("falling", "rising") \
                or (p.failure - p.nominal) * (1 if p.direction == "rising" else -1) <= 0:
            raise ScenarioError(f"catalog: part {p.part_id}: failure threshold {p.failure} must lie "
                                f"{'above' if p.direction == 'rising' else 'below'} nominal {p.nominal} "
                                f"(direction {p.direction!r})")
    return parts


def _uniform(rng: np.random.Generator, r: tuple[float, float]) -> float:
    return float(rng.uniform(r[0], r[1])) if r[1] > r[0] else float(r[0])


def _fault_magnitude(kind: str, signal: str, parts: dict[str, PartSpec], rng: np.random.Generator) -> float:
    scale = {p.signal: p.nominal for p in parts.values()}.get(signal) or {
        "engine_rpm": 1800.0, "engine_load_pct": 60.0, "ambient_temp_c": 10.0}.get(signal, 1.0)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if kind == "spike":
        return sign * scale * _uniform(rng, (0.3, 0.6))
    if kind == "offset":
        return sign * scale * _uniform(rng, (0.05, 0.12))
    if kind == "noise":
        return scale * _uniform(rng, (0.05, 0.1))
    return 0.0


def build(sc: ScenarioFile, *, tractors: int | None = None, days: float | None = None, seed: int | None = None,
          period_s: float | None = None, degrading: int | None = None, start: datetime | None = None,
          catalog: list[dict[str, Any]] | None = None) -> tuple[Fleet, float, float]:
    """The fleet of scenario ``sc`` (command-line values override the file's); returns (fleet, days, period_s)."""
    n = tractors if tractors is not None else sc.tractors
    days = days if days is not None else sc.days
    seed = seed if seed is not None else sc.seed
    period = period_s if period_s is not None else sc.period_s
    if n < 1 or days <= 0 or period <= 0:
        raise ScenarioError("need at least one tractor, a positive number of days and a positive period")
    if days * DAY / period > 50_000_000:
        raise ScenarioError(f"{days} days every {period} s is too many steps")
    begin = (start or sc.start or start_for(days))
    begin = begin.replace(tzinfo=UTC) if begin.tzinfo is None else begin.astimezone(UTC)
    parts = checked_parts(catalog)
    run_s = days * DAY
    wear: list[Wear] = []
    taken: set[tuple[int, str]] = set()

    def add_wear(i: int, part: PartSpec, kind: str, onset_s: float, failure_s: float, where: str) -> None:
        if not 0 <= i < n:
            raise ScenarioError(f"{where}: tractor {i + 1} is not in a fleet of {n}")
        if failure_s <= onset_s:
            raise ScenarioError(f"{where}: failure must come after the onset")
        if (i, part.part_id) not in taken:
            taken.add((i, part.part_id))
            wear.append(Wear(i, part.part_id, part.signal, kind, onset_s, failure_s))

    if sc.degrading is not None:
        d = sc.degrading
        count = degrading if degrading is not None else d.count
        if count > n:
            raise ScenarioError(f"degrading: {count} tractors asked, the fleet has {n}")
        part = _check_part(parts, d.part, "degrading")
        for i in range(count):
            add_wear(i, part, d.kind, d.onset_day * DAY, run_s + d.failure_after_end_days * DAY, "degrading")
    elif degrading:
        raise ScenarioError(f"scenario {sc.name!r} has no [degrading] section, so --degrading does not apply")
    for k, e in enumerate(sc.wear):
        where = f"wear[{k}]"
        part = _check_part(parts, e.part, where)
        fail_s = e.failure_day * DAY if e.failure_day is not None else run_s + (e.failure_after_end_days or 0.0) * DAY
        targets = [e.tractor - 1] if e.tractor is not None else list(range(min(e.first or 0, n)))
        for i in targets:
            add_wear(i, part, e.kind, e.onset_day * DAY, fail_s, where)

    rng = np.random.default_rng([seed, 3])
    mix = sc.wear_mix
    if mix.fraction > 0:
        names = mix.parts or sorted(parts)
        chosen_parts = [_check_part(parts, p, "wear_mix.parts") for p in names]
        count = int(round(mix.fraction * n))
        who = rng.permutation(n)[:count].tolist()
        for k, i in enumerate(who):
            part = chosen_parts[k % len(chosen_parts)]
            kind = mix.kinds[(k // len(chosen_parts)) % len(mix.kinds)]
            duration = _uniform(rng, getattr(mix, f"{kind}_days")) * DAY
            failure_s = max(_uniform(rng, mix.failure_at) * run_s, 2 * DAY)
            onset_s = max(failure_s - duration, 0.5 * DAY)
            if failure_s - onset_s < DAY:
                failure_s = onset_s + DAY
            add_wear(i, part, kind, round(onset_s), round(failure_s), "wear_mix")

    faults: list[Fault] = []
    for k, f in enumerate(sc.faults):
        where = f"faults[{k}]"
        _check_signal(f.signal, where)
        if not 1 <= f.tractor <= n:
            raise ScenarioError(f"{where}: tractor {f.tractor} is not in a fleet of {n}")
        frng = np.random.default_rng([seed, 4, k])
        magnitude = f.magnitude if f.magnitude is not None else _fault_magnitude(f.kind, f.signal, parts, frng)
        start_s = _on_grid(f.start_day * DAY, period)
        faults.append(Fault(f.tractor - 1, f.signal, f.kind, start_s, start_s + f.duration_hours * HOUR, magnitude))
    fm = sc.fault_mix
    if fm.fraction > 0:
        for s in fm.signals:
            _check_signal(s, "fault_mix.signals")
        frng = np.random.default_rng([seed, 5])
        who = frng.permutation(n)[:int(round(fm.fraction * n))].tolist()
        k = 0
        for i in who:
            for _ in range(fm.per_tractor):
                kind = fm.kinds[k % len(fm.kinds)]
                signal = fm.signals[int(frng.integers(len(fm.signals)))]
                start_s = _on_grid(_uniform(frng, (0.05, 0.95)) * run_s, period)
                hours = 0.0 if kind in ("spike", "out_of_range") else _uniform(frng, getattr(fm, f"{kind}_hours"))
                faults.append(Fault(i, signal, kind, start_s, start_s + hours * HOUR,
                                    _fault_magnitude(kind, signal, parts, frng)))
                k += 1
    for f in faults:
        if f.kind not in FAULT_KINDS:
            raise ScenarioError(f"unknown fault kind {f.kind!r}")

    net = sc.network
    nrng = np.random.default_rng([seed, 8])
    gaps: list[tuple[int, float, float]] = []
    if net.gap_tractor_fraction > 0:
        for i in sorted(nrng.permutation(n)[:int(round(net.gap_tractor_fraction * n))].tolist()):
            spans = sorted((s, s + _uniform(nrng, net.gap_hours) * HOUR)
                           for s in nrng.uniform(0, run_s, max(1, int(nrng.poisson(net.gaps_per_tractor)))).tolist())
            merged: list[tuple[float, float]] = []
            for a, b in spans:
                a, b = round(a), round(b)
                if merged and a <= merged[-1][1]:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], b))
                else:
                    merged.append((a, b))
            gaps += [(i, a, b) for a, b in merged]
    skew: dict[int, float] = {}
    if net.clock_skew_fraction > 0:
        for i in sorted(nrng.permutation(n)[:int(round(net.clock_skew_fraction * n))].tolist()):
            skew[i] = round(_uniform(nrng, net.clock_skew_s), 1)
    network = Network(gaps=gaps, duplicate_probability=net.duplicate_probability,
                      reorder_probability=net.reorder_probability, clock_skew_s=skew,
                      samples_per_message=net.samples_per_message)
    sched = sc.schedule
    schedule = Schedule(work_day_probability=sched.work_day_probability,
                        sunday_work_probability=sched.sunday_work_probability, start_hour=sched.start_hour,
                        end_hour=sched.end_hour, lunch_engine_off_probability=sched.lunch_engine_off_probability,
                        field_rpm=sched.field_rpm, field_load=sched.field_load)
    names: list[str] | None = None
    if sc.models:
        names, rpm_lo, rpm_hi, load_lo, load_hi = _assign_models(sc, n, seed)
        schedule = replace(schedule, field_rpm=(rpm_lo, rpm_hi), field_load=(load_lo, load_hi))
    climate = Climate(**sc.climate.model_dump())
    fleet = Fleet(n, seed, begin, wear=wear, faults=faults, network=network, parts=parts, schedule=schedule,
                  climate=climate, scenario=sc.name, model_names=names)
    return fleet, days, period


def _assign_models(sc: ScenarioFile, n: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray,
                                                                    np.ndarray]:
    """Each tractor's model (shares rounded by largest remainder, shuffled) and its field-work ranges."""
    shares = np.array([m.share for m in sc.models], dtype=np.float64)
    exact = shares / shares.sum() * n
    counts = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - counts), kind="stable")[: n - int(counts.sum())]:
        counts[k] += 1
    which = np.random.default_rng([seed, 9]).permutation(np.repeat(np.arange(len(sc.models)), counts))
    default = sc.schedule
    rpm = np.array([m.field_rpm or default.field_rpm for m in sc.models], dtype=np.float64)[which]
    load = np.array([m.field_load or default.field_load for m in sc.models], dtype=np.float64)[which]
    return [sc.models[k].name for k in which], rpm[:, 0], rpm[:, 1], load[:, 0], load[:, 1]


def _on_grid(seconds: float, period: float) -> float:
    """The first sampling instant at or after ``seconds`` (faults start on a sample)."""
    return float(np.ceil(seconds / period) * period)

"""The coupled tractor model: operating modes, conditions and the 13 sensor signals, vectorised over a fleet.

Every wear signal is a function of the operating conditions and of one *reference level* ``L`` per part:
the value the signal takes at the reference operating point (engine 1800 rpm, 60 % load, 20 °C ambient,
95 °C oil). Wear moves ``L`` from its healthy value to the catalog's failure threshold, so the catalog
thresholds and the ground-truth failure times mean the same thing. docs/simulator.md lists the equations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

DAY = 86_400.0
HOUR = 3_600.0

# The operating point the catalog's thresholds refer to.
REFERENCE: dict[str, float] = {"engine_rpm": 1800.0, "engine_load_pct": 60.0, "ambient_temp_c": 20.0,
                               "oil_temp_c": 95.0}
R_RPM, R_LOAD, R_AMB, R_OIL = 1800.0, 60.0, 20.0, 95.0

SIGNAL_ORDER: tuple[str, ...] = (
    "engine_rpm", "engine_load_pct", "oil_pressure_kpa", "oil_temp_c", "coolant_temp_c", "ambient_temp_c",
    "hydraulic_pressure_bar", "vibration_mm_s", "battery_v", "air_filter_dp_kpa", "fuel_rate_lph",
    "fuel_filter_dp_kpa", "dpf_soot_pct",
)
SIGNAL_INDEX = {s: i for i, s in enumerate(SIGNAL_ORDER)}
# Decimals each signal is published with, and the measurement noise (one standard deviation).
DECIMALS = {"engine_rpm": 1, "engine_load_pct": 1, "oil_pressure_kpa": 1, "oil_temp_c": 2, "coolant_temp_c": 2,
            "ambient_temp_c": 2, "hydraulic_pressure_bar": 1, "vibration_mm_s": 3, "battery_v": 3,
            "air_filter_dp_kpa": 3, "fuel_rate_lph": 2, "fuel_filter_dp_kpa": 2, "dpf_soot_pct": 2}
NOISE = {"engine_rpm": 5.0, "engine_load_pct": 1.0, "oil_pressure_kpa": 4.0, "oil_temp_c": 0.4,
         "coolant_temp_c": 0.4, "ambient_temp_c": 0.2, "hydraulic_pressure_bar": 2.0, "vibration_mm_s": 0.08,
         "battery_v": 0.03, "air_filter_dp_kpa": 0.03, "fuel_rate_lph": 0.3, "fuel_filter_dp_kpa": 0.5,
         "dpf_soot_pct": 0.5}
# Plausible ranges of the v1 contract (ingest/contract.py); emitted values are clipped into them.
RANGES = {"engine_rpm": (0, 4000), "engine_load_pct": (0, 110), "oil_pressure_kpa": (0, 1000),
          "oil_temp_c": (-40, 180), "coolant_temp_c": (-40, 150), "ambient_temp_c": (-50, 60),
          "hydraulic_pressure_bar": (0, 400), "vibration_mm_s": (0, 100), "battery_v": (0, 32),
          "air_filter_dp_kpa": (0, 20), "fuel_rate_lph": (0, 150), "fuel_filter_dp_kpa": (0, 200),
          "dpf_soot_pct": (0, 150)}

OFF, IDLE, FIELD, ROAD = 0, 1, 2, 3
MODE_NAMES = {OFF: "off", IDLE: "idle", FIELD: "field", ROAD: "road"}


@dataclass(frozen=True)
class PartSpec:
    """A replaceable part as the simulator needs it: its signal and thresholds at the reference point."""

    part_id: str
    signal: str
    direction: str  # "falling" | "rising"
    nominal: float
    failure: float
    warning: float | None = None


# Used when no catalog is passed in; the same numbers as ordering/catalog.toml at the time of writing.
DEFAULT_PARTS: dict[str, PartSpec] = {p.part_id: p for p in (
    PartSpec("OIL-PUMP", "oil_pressure_kpa", "falling", 320.0, 150.0, 220.0),
    PartSpec("COOLANT-PUMP", "coolant_temp_c", "rising", 88.0, 110.0, 102.0),
    PartSpec("HYD-PUMP", "hydraulic_pressure_bar", "falling", 190.0, 120.0, 150.0),
    PartSpec("ALTERNATOR", "battery_v", "falling", 13.9, 12.0, 12.6),
    PartSpec("AIR-FILTER", "air_filter_dp_kpa", "rising", 1.5, 6.0, 4.5),
    PartSpec("FUEL-FILTER", "fuel_filter_dp_kpa", "rising", 20.0, 80.0, 60.0),
    PartSpec("BEARING", "vibration_mm_s", "rising", 2.0, 11.2, 7.1),
    PartSpec("DPF", "dpf_soot_pct", "rising", 30.0, 100.0, 85.0),
    PartSpec("INJECTORS", "fuel_rate_lph", "rising", 20.0, 26.0, 23.5),
    PartSpec("OIL-COOLER", "oil_temp_c", "rising", 95.0, 120.0, 110.0),
)}
WEAR_SIGNALS: tuple[str, ...] = tuple(p.signal for p in DEFAULT_PARTS.values())

# Slow drift of a *healthy* part's reference level per engine hour (filters load with dust and dirt, ash
# builds up in the DPF); small enough that a healthy part stays well short of its warning threshold.
HEALTHY_DRIFT_PER_H = {"air_filter_dp_kpa": 0.0003, "fuel_filter_dp_kpa": 0.002, "dpf_soot_pct": 0.002}


def parts_from_catalog(rows: list[dict[str, Any]] | None) -> dict[str, PartSpec]:
    """Part specs from catalog rows (``fleetwatch.db.load_catalog``), falling back to the defaults."""
    parts = dict(DEFAULT_PARTS)
    for r in rows or []:
        parts[str(r["part_id"])] = PartSpec(str(r["part_id"]), str(r["signal"]), str(r["direction"]),
                                            float(r["nominal"]), float(r["failure_threshold"]),
                                            float(r["warning_threshold"]) if "warning_threshold" in r else None)
    return parts


# ---------------------------------------------------------------------------------------------- physics
# Pure functions of (reference level L, conditions). Each returns exactly L at the reference point.

def oil_pressure(level: np.ndarray, rpm: np.ndarray, oil_t: np.ndarray) -> np.ndarray:
    """Pump delivery rises with engine speed; hot, thin oil lowers the pressure. A worn pump scales it down."""
    return level * (np.maximum(rpm, 1.0) / R_RPM) ** 0.7 * np.clip(1 - 0.004 * (oil_t - R_OIL), 0.6, 1.4)


def coolant_steady(level: np.ndarray, load: np.ndarray, amb: np.ndarray) -> np.ndarray:
    """Steady coolant temperature: ambient plus a rise that grows with load; wear scales the rise."""
    return amb + (level - R_AMB) * (0.75 + 0.25 * load / R_LOAD)


def oil_temp_steady(level: np.ndarray, load: np.ndarray, amb: np.ndarray, coolant_excess: np.ndarray) -> np.ndarray:
    """Steady oil temperature: like coolant, plus 30 % of any excess coolant heat from a failing coolant pump."""
    return amb + (level - R_AMB) * (0.7 + 0.3 * load / R_LOAD) + 0.3 * coolant_excess


def hydraulic_pressure(level: np.ndarray, rpm: np.ndarray, oil_t: np.ndarray, implement: np.ndarray) -> np.ndarray:
    """System pressure with the implement's demand (1 at field work); pump wear = internal leakage."""
    return level * (np.maximum(rpm, 1.0) / R_RPM) ** 0.3 * np.clip(1 - 0.002 * (oil_t - R_OIL), 0.8, 1.2) * implement


def battery_voltage(level: np.ndarray, rpm: np.ndarray, amb: np.ndarray) -> np.ndarray:
    """Charging voltage above the 12.4 V rest voltage, weaker at low engine speed, temperature compensated."""
    charge = np.sqrt(np.clip((rpm - 600.0) / (R_RPM - 600.0), 0.0, 1.15))
    return 12.4 + (level - 12.4) * charge - 0.015 * (amb - R_AMB)


def vibration(level: np.ndarray, rpm: np.ndarray, load: np.ndarray) -> np.ndarray:
    """Vibration velocity grows with engine speed and a little with load; a bearing defect scales it."""
    return level * (np.maximum(rpm, 1.0) / R_RPM) ** 1.5 * (0.85 + 0.15 * load / R_LOAD)


def air_filter_dp(level: np.ndarray, rpm: np.ndarray, load: np.ndarray) -> np.ndarray:
    """Pressure drop grows with the square of the air flow (speed × boost); clogging scales it."""
    return level * ((rpm / R_RPM) * (0.6 + 0.4 * load / R_LOAD)) ** 2


def fuel_rate(level: np.ndarray, rpm: np.ndarray, load: np.ndarray) -> np.ndarray:
    """Fuel burned follows load (plus a little friction with speed); worn injectors waste fuel."""
    return level * (0.1 * rpm / R_RPM + 0.9 * load / R_LOAD)


def fuel_filter_dp(level: np.ndarray, rpm: np.ndarray, load: np.ndarray) -> np.ndarray:
    """Pressure drop follows the fuel supply flow (speed and load); a clogging filter scales it."""
    return level * (0.5 * rpm / R_RPM + 0.5 * load / R_LOAD)


def dpf_soot(level: np.ndarray, soot: np.ndarray) -> np.ndarray:
    """Soot load: the part's baseline (ash, damage) plus soot that builds at low load and burns off (regenerates)."""
    return level + soot


# ---------------------------------------------------------------------------------------------- schedule
@dataclass
class DayPlan:
    """One day's working plan for every tractor (seconds of the UTC day, arrays of length n)."""

    works: np.ndarray
    on: np.ndarray
    field_from: np.ndarray
    lunch_from: np.ndarray
    lunch_to: np.ndarray
    lunch_off: np.ndarray
    field_to: np.ndarray
    off: np.ndarray
    rpm_field: np.ndarray
    load_field: np.ndarray
    rpm_road: np.ndarray
    load_road: np.ndarray

    def mode(self, tod: float) -> np.ndarray:
        """Operating mode of every tractor at ``tod`` seconds into the day."""
        m = np.full(self.works.shape, OFF, dtype=np.int8)
        running = self.works & (tod >= self.on) & (tod < self.off)
        m[running] = ROAD
        m[running & (tod < self.on + 600)] = IDLE  # warm-up
        m[running & (tod >= self.field_from) & (tod < self.field_to)] = FIELD
        lunch = running & (tod >= self.lunch_from) & (tod < self.lunch_to)
        m[lunch] = np.where(self.lunch_off[lunch], OFF, IDLE)
        return m


@dataclass(frozen=True)
class Schedule:
    """How a fleet works: probabilities and ranges the daily plans are drawn from."""

    work_day_probability: float = 0.85
    sunday_work_probability: float = 0.15
    start_hour: tuple[float, float] = (6.0, 8.5)
    end_hour: tuple[float, float] = (16.5, 20.0)
    road_minutes: tuple[float, float] = (10.0, 40.0)
    lunch_minutes: tuple[float, float] = (30.0, 60.0)
    lunch_engine_off_probability: float = 0.5
    # Ranges the day's field-work setpoints are drawn from; per-tractor arrays when the fleet mixes models.
    field_rpm: tuple[float | np.ndarray, float | np.ndarray] = (1750.0, 2050.0)
    field_load: tuple[float | np.ndarray, float | np.ndarray] = (50.0, 80.0)


@dataclass(frozen=True)
class Climate:
    """Ambient temperature: per-tractor mean and daily swing, plus weather that drifts over days."""

    mean_c: float = 14.0
    mean_spread_c: float = 5.0  # std of the per-tractor mean (tractors work in different regions)
    daily_amplitude_c: tuple[float, float] = (4.0, 8.0)
    weather_sigma_c: float = 3.0
    weather_tau_days: float = 1.0


def day_plan(seed: int, day: int, n: int, schedule: Schedule) -> DayPlan:
    """The plan of absolute UTC day ``day`` (days since 1970), a pure function of (seed, day, n)."""
    rng = np.random.default_rng([seed, 101, day])
    sunday = (day + 3) % 7 == 6  # 1970-01-01 was a Thursday
    p = schedule.sunday_work_probability if sunday else schedule.work_day_probability
    works = rng.random(n) < p
    on = rng.uniform(*schedule.start_hour, n) * HOUR
    off = rng.uniform(*schedule.end_hour, n) * HOUR
    road_out = rng.uniform(*schedule.road_minutes, n) * 60
    road_back = rng.uniform(*schedule.road_minutes, n) * 60
    lunch_from = rng.uniform(11.5, 13.0, n) * HOUR
    lunch_to = lunch_from + rng.uniform(*schedule.lunch_minutes, n) * 60
    return DayPlan(
        works=works, on=on, field_from=on + 600 + road_out, lunch_from=lunch_from, lunch_to=lunch_to,
        lunch_off=rng.random(n) < schedule.lunch_engine_off_probability, field_to=off - road_back, off=off,
        rpm_field=rng.uniform(*schedule.field_rpm, n), load_field=rng.uniform(*schedule.field_load, n),
        rpm_road=rng.uniform(1500.0, 2100.0, n), load_road=rng.uniform(25.0, 45.0, n),
    )


# ---------------------------------------------------------------------------------------------- state
def _ar_step(state: np.ndarray, rng: np.random.Generator, dt: float, tau: float, sigma: float) -> np.ndarray:
    """One exact step of an Ornstein–Uhlenbeck process with time constant ``tau`` and stationary std ``sigma``."""
    phi = np.exp(-dt / tau)
    return state * phi + rng.normal(0.0, sigma * np.sqrt(1 - phi * phi), state.shape)


def _lag(value: np.ndarray, target: np.ndarray, dt: float, tau: float) -> np.ndarray:
    return value + (target - value) * (1 - np.exp(-dt / tau))


class TractorModel:
    """The physical state of n tractors, advanced in steps; readings come out as an (n, 13) array."""

    def __init__(self, n: int, seed: int, start_epoch: float, parts: dict[str, PartSpec],
                 schedule: Schedule | None = None, climate: Climate | None = None) -> None:
        self.n = n
        self.climate = climate or Climate()
        self.seed = seed
        self.start_epoch = start_epoch
        self.schedule = schedule or Schedule()
        self.parts = parts
        self.part_of_signal = {p.signal: p for p in parts.values()}
        rng = np.random.default_rng([seed, 1])
        self.noise_rng = np.random.default_rng([seed, 2])
        self.engine_hours = np.round(rng.uniform(200.0, 3000.0, n), 1)
        self.hours_run = np.zeros(n)  # engine hours since the start of the simulation
        c = self.climate
        self.amb_mean = c.mean_c + c.mean_spread_c * rng.standard_normal(n)
        self.amb_amp = rng.uniform(*c.daily_amplitude_c, n)
        self.dust = rng.uniform(0.5, 1.5, n)  # how dusty this tractor's fields are
        self.weather = c.weather_sigma_c * rng.standard_normal(n)
        self.e_rpm = np.zeros(n)
        self.e_load = np.zeros(n)
        self.implement = np.ones(n)
        amb0 = self.amb_mean
        self.coolant = amb0.copy()
        self.oil = amb0.copy()
        self.soot = rng.uniform(0.0, 10.0, n)
        self.regenerating = np.zeros(n, dtype=bool)
        self._plan_day: int | None = None
        self._plan: DayPlan | None = None
        self.mode = np.zeros(n, dtype=np.int8)
        self.rpm = np.zeros(n)
        self.load = np.zeros(n)
        self.amb = amb0.copy()

    # The healthy reference level of each wear signal (drifting filters), shape (n,).
    def healthy_level(self, signal: str) -> np.ndarray:
        """Reference level of the healthy part on ``signal`` for every tractor, now."""
        nominal = self.part_of_signal[signal].nominal if signal in self.part_of_signal else 0.0
        drift = HEALTHY_DRIFT_PER_H.get(signal, 0.0)
        if signal == "air_filter_dp_kpa":
            return nominal + drift * self.dust * self.hours_run
        return nominal + drift * self.hours_run

    def plan(self, t: float) -> tuple[DayPlan, float]:
        """The day plan in force at simulated second ``t`` and the UTC time of day."""
        epoch = self.start_epoch + t
        day = int(epoch // DAY)
        if day != self._plan_day:
            self._plan = day_plan(self.seed, day, self.n, self.schedule)
            self._plan_day = day
        assert self._plan is not None
        return self._plan, epoch - day * DAY

    def step(self, t: float, dt: float, levels: dict[str, np.ndarray]) -> np.ndarray:
        """Advance to ``t`` (``dt`` after the previous step) and return the readings, shape (n, 13).

        ``levels`` holds each wear signal's current reference level per tractor (healthy or worn).
        Rows of tractors whose engine is off are filled but meaningless; see ``self.mode``.
        """
        n, rng = self.n, self.noise_rng
        plan, tod = self.plan(t)
        mode = plan.mode(tod)
        self.mode = mode
        running = mode != OFF
        field, road, idle = mode == FIELD, mode == ROAD, mode == IDLE

        clim = self.climate
        self.weather = _ar_step(self.weather, rng, dt, clim.weather_tau_days * DAY, clim.weather_sigma_c)
        amb = self.amb_mean + self.amb_amp * np.cos(2 * np.pi * (tod / HOUR - 15.0) / 24.0) + self.weather
        self.e_rpm = _ar_step(self.e_rpm, rng, dt, 120.0, 1.0)
        self.e_load = _ar_step(self.e_load, rng, dt, 300.0, 1.0)
        self.implement = np.where(field, 1.0 + _ar_step(self.implement - 1.0, rng, dt, 600.0, 0.04), 0.92)
        rpm = np.select([field, road, idle], [plan.rpm_field + 60 * self.e_rpm, plan.rpm_road + 80 * self.e_rpm,
                                              850.0 + 15 * self.e_rpm], 0.0)
        load = np.select([field, road, idle], [plan.load_field + 8 * self.e_load, plan.load_road + 6 * self.e_load,
                                               12.0 + 2 * self.e_load], 0.0)
        rpm = np.clip(rpm, 0.0, 2600.0)
        load = np.clip(load, 0.0, 100.0)

        cool_level = levels["coolant_temp_c"]
        cool_nominal = self.healthy_level("coolant_temp_c")
        cool_ss = coolant_steady(cool_level, load, amb)
        excess = cool_ss - coolant_steady(cool_nominal, load, amb)
        oil_ss = oil_temp_steady(levels["oil_temp_c"], load, amb, excess)
        # Engines warm up with a lag and cool down to ambient slowly once switched off.
        self.coolant = np.where(running, _lag(self.coolant, cool_ss, dt, 480.0), _lag(self.coolant, amb, dt, 5400.0))
        self.oil = np.where(running, _lag(self.oil, oil_ss, dt, 900.0), _lag(self.oil, amb, dt, 7200.0))
        # Soot builds at low load and burns off passively above 55 %; at 30 % the engine control unit starts an
        # active regeneration that burns it down to 5 % (the DPF's sawtooth).
        self.regenerating = running & np.where(self.regenerating, self.soot > 5.0, self.soot >= 30.0)
        soot_rate = np.where(load < 45.0, 8.0 * (45.0 - load) / 45.0, 0.0) - np.where(
            load > 55.0, 20.0 * (load - 55.0) / 45.0, 0.0) - np.where(self.regenerating, 60.0, 0.0)
        self.soot = np.where(running, np.clip(self.soot + soot_rate * dt / HOUR, 0.0, 40.0), self.soot)
        hours = np.where(running, dt / HOUR, 0.0)
        self.engine_hours = self.engine_hours + hours
        self.hours_run = self.hours_run + hours * np.where(field, 1.0, 0.5)
        self.rpm, self.load, self.amb = rpm, load, amb

        out = np.empty((n, len(SIGNAL_ORDER)))
        col = SIGNAL_INDEX
        out[:, col["engine_rpm"]] = rpm
        out[:, col["engine_load_pct"]] = load
        out[:, col["ambient_temp_c"]] = amb
        out[:, col["coolant_temp_c"]] = self.coolant
        out[:, col["oil_temp_c"]] = self.oil
        out[:, col["oil_pressure_kpa"]] = oil_pressure(levels["oil_pressure_kpa"], rpm, self.oil)
        out[:, col["hydraulic_pressure_bar"]] = hydraulic_pressure(levels["hydraulic_pressure_bar"], rpm, self.oil,
                                                                   self.implement)
        out[:, col["vibration_mm_s"]] = vibration(levels["vibration_mm_s"], rpm, load)
        out[:, col["battery_v"]] = battery_voltage(levels["battery_v"], rpm, amb)
        out[:, col["air_filter_dp_kpa"]] = air_filter_dp(levels["air_filter_dp_kpa"], rpm, load)
        out[:, col["fuel_rate_lph"]] = fuel_rate(levels["fuel_rate_lph"], rpm, load)
        out[:, col["fuel_filter_dp_kpa"]] = fuel_filter_dp(levels["fuel_filter_dp_kpa"], rpm, load)
        out[:, col["dpf_soot_pct"]] = dpf_soot(levels["dpf_soot_pct"], self.soot)
        out += rng.normal(0.0, 1.0, out.shape) * NOISE_VECTOR
        return out


NOISE_VECTOR = np.array([NOISE[s] for s in SIGNAL_ORDER])
LOW = np.array([RANGES[s][0] for s in SIGNAL_ORDER], dtype=np.float64)
HIGH = np.array([RANGES[s][1] for s in SIGNAL_ORDER], dtype=np.float64)

"""The v1 telemetry contract: signals with units and plausible ranges, topics and payload shape."""

from __future__ import annotations

import re
from dataclasses import dataclass

PAYLOAD_VERSION = 1
TELEMETRY_TOPIC_FILTER = "tractors/+/telemetry"
# \A...\Z, not ^...$: "$" would also accept a trailing newline.
TRACTOR_ID_RE = re.compile(r"\A[A-Za-z0-9_-]{1,32}\Z")


def telemetry_topic(tractor_id: str) -> str:
    """MQTT topic a tractor publishes its telemetry on."""
    return f"tractors/{tractor_id}/telemetry"


def status_topic(tractor_id: str) -> str:
    """MQTT topic of a tractor's retained online/offline status."""
    return f"tractors/{tractor_id}/status"


@dataclass(frozen=True)
class Signal:
    """A sensor reading's name, unit and physically plausible range."""

    name: str
    unit: str
    low: float
    high: float
    description: str


SIGNALS: dict[str, Signal] = {
    s.name: s
    for s in (
        Signal("engine_rpm", "rpm", 0, 4000, "engine speed"),
        Signal("engine_load_pct", "%", 0, 110, "engine load"),
        Signal("oil_pressure_kpa", "kPa", 0, 1000, "engine oil pressure"),
        Signal("oil_temp_c", "degC", -40, 180, "engine oil temperature"),
        Signal("coolant_temp_c", "degC", -40, 150, "engine coolant temperature"),
        Signal("ambient_temp_c", "degC", -50, 60, "ambient air temperature"),
        Signal("hydraulic_pressure_bar", "bar", 0, 400, "hydraulic system pressure"),
        Signal("vibration_mm_s", "mm/s", 0, 100, "bearing vibration velocity RMS"),
        Signal("battery_v", "V", 0, 32, "battery voltage"),
        Signal("air_filter_dp_kpa", "kPa", 0, 20, "air filter differential pressure"),
        Signal("fuel_rate_lph", "L/h", 0, 150, "fuel consumption rate"),
        Signal("fuel_filter_dp_kpa", "kPa", 0, 200, "fuel filter differential pressure"),
        Signal("dpf_soot_pct", "%", 0, 150, "diesel particulate filter soot load"),
    )
}

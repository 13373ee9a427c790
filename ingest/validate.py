"""Validation and normalisation of v1 telemetry payloads into accepted samples and rejections."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from orjson import loads as _fast_loads

from ingest.contract import PAYLOAD_VERSION, SIGNALS, TRACTOR_ID_RE

# orjson parses the common (strict JSON) payload several times faster; whatever it refuses goes to the stdlib parser.
FastLoads = Callable[[bytes], Any] | None


@dataclass(frozen=True)
class Limits:
    """Bounds the validator enforces; set from settings by the bridge."""

    max_payload_bytes: int = 256 * 1024
    max_samples: int = 2000
    max_future_skew: timedelta = timedelta(minutes=5)
    max_age: timedelta = timedelta(days=400)


@dataclass(frozen=True)
class Rejection:
    """Why (part of) a message was refused: a stable reason code plus a human detail."""

    reason: str
    detail: str
    sample_index: int | None = None


@dataclass
class Verdict:
    """Outcome of validating one MQTT message."""

    tractor_id: str | None = None
    seq: int | None = None
    message: dict[str, Any] | None = None  # normalised v1 message holding only the valid samples
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        """True when at least one sample is forwarded."""
        return self.message is not None


def _reject(reason: str, detail: str, tractor_id: str | None = None, seq: int | None = None) -> Verdict:
    return Verdict(tractor_id=tractor_id, seq=seq, rejections=[Rejection(reason, detail)])


def topic_tractor(topic: str) -> str | None:
    """Tractor id from ``tractors/{id}/telemetry`` or None when the topic has another shape."""
    parts = topic.split("/")
    if len(parts) == 3 and parts[0] == "tractors" and parts[2] == "telemetry":
        return parts[1]
    return None


def parse_ts(value: object) -> datetime | None:
    """An ISO-8601 UTC timestamp as an aware datetime, or None when it is not one."""
    if not isinstance(value, str) or not 20 <= len(value) <= 35:
        return None
    try:
        ts = datetime.fromisoformat(value)
        if ts.tzinfo is None:
            return None
        return ts.astimezone(UTC)
    except (ValueError, OverflowError):  # not ISO-8601, or an offset that moves it outside years 1..9999
        return None


@lru_cache(maxsize=8192)
def _sample_ts(value: str) -> tuple[datetime, str] | None:
    """A sample's ts parsed and in contract format; cached because a fleet sends the same second many times."""
    ts = parse_ts(value)
    return None if ts is None else (ts, format_ts(ts))


def format_ts(ts: datetime) -> str:
    """Contract timestamp format: ISO-8601 UTC with milliseconds and a Z."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def _finite(value: object) -> float | None:
    """A JSON number as a finite float; None for other types, NaN, infinities and ints too big for a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _check_sample(raw: object, earliest: datetime, latest: datetime, limits: Limits,
                  ) -> tuple[dict[str, Any] | None, Rejection | None]:
    if not isinstance(raw, dict):
        return None, Rejection("sample_not_object", "each sample must be a JSON object")
    value = raw.get("ts")
    parsed = _sample_ts(value) if isinstance(value, str) else None
    if parsed is None:
        return None, Rejection("bad_timestamp", "ts must be an ISO-8601 UTC timestamp like 2026-11-27T13:00:00.000Z")
    ts, ts_text = parsed
    if ts > latest:
        return None, Rejection("timestamp_in_future", f"ts {ts_text} is ahead of the receive time")
    if ts < earliest:
        return None, Rejection("timestamp_too_old", f"ts {ts_text} is older than {limits.max_age.days} days")
    hours = _finite(raw.get("engine_hours"))
    if hours is None or not 0 <= hours <= 1_000_000:
        return None, Rejection("bad_engine_hours", "engine_hours must be a finite number in [0, 1000000]")
    readings = raw.get("readings")
    if not isinstance(readings, dict) or not readings:
        return None, Rejection("bad_readings", "readings must be a non-empty object of signal: number")
    clean: dict[str, float] = {}
    for name, value in readings.items():
        signal = SIGNALS.get(name) if isinstance(name, str) else None
        if signal is None:
            return None, Rejection("unknown_signal", f"unknown signal {str(name)[:64]!r}")
        if type(value) is float and signal.low <= value <= signal.high:  # the common case (NaN fails the test)
            clean[name] = value
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None, Rejection("bad_reading_type", f"{name} must be a number, got {type(value).__name__}")
        number = _finite(value)
        if number is None:
            return None, Rejection("non_finite_reading", f"{name} is NaN, infinite or too large for a float")
        if not signal.low <= number <= signal.high:
            detail = f"{name}={number:g} outside plausible range [{signal.low:g}, {signal.high:g}] {signal.unit}"
            return None, Rejection("reading_out_of_range", detail)
        clean[name] = number
    return {"ts": ts_text, "engine_hours": hours, "readings": clean}, None


def _parse(payload: bytes, fast: FastLoads) -> Any:  # noqa: ANN401
    """The JSON document; raises ValueError/RecursionError exactly when the stdlib parser does."""
    if fast is not None and payload[:1] == b"{":
        try:
            return fast(payload)
        except ValueError:
            pass  # NaN, Infinity, lone surrogates, ... : the stdlib parser decides (and words the detail)
    return json.loads(payload.decode("utf-8"))  # strictly UTF-8: no BOM, no UTF-16/32 guessing


def validate(topic: str, payload: bytes, now: datetime | None = None, limits: Limits = Limits(),
             fast_loads: FastLoads = _fast_loads) -> Verdict:
    """Check one MQTT message against the v1 contract; never raises.

    ``fast_loads`` (orjson) is only a speed-up: with ``None`` the stdlib parser gives the same verdict.
    """
    now = now or datetime.now(UTC)
    if len(payload) > limits.max_payload_bytes:
        return _reject("payload_too_large", f"{len(payload)} bytes > limit {limits.max_payload_bytes}")
    topic_id = topic_tractor(topic)
    if topic_id is None or not TRACTOR_ID_RE.match(topic_id):
        return _reject("bad_topic", f"topic {topic[:128]!r} is not tractors/<tractor_id>/telemetry")
    if not payload.strip():
        return _reject("empty_payload", "payload is empty", topic_id)
    try:
        doc = _parse(payload, fast_loads)
    except (ValueError, RecursionError) as exc:
        return _reject("bad_json", f"not valid UTF-8 JSON: {str(exc)[:200]}", topic_id)
    if not isinstance(doc, dict):
        return _reject("not_an_object", "payload must be a JSON object", topic_id)
    if doc.get("v") != PAYLOAD_VERSION or isinstance(doc.get("v"), bool):
        return _reject("unsupported_version", f"v must be {PAYLOAD_VERSION}", topic_id)
    tractor_id = doc.get("tractor_id")
    if not isinstance(tractor_id, str) or not TRACTOR_ID_RE.match(tractor_id):
        return _reject("bad_tractor_id", "tractor_id must be 1-32 characters of A-Z a-z 0-9 _ -", topic_id)
    if tractor_id != topic_id:
        return _reject("tractor_mismatch", f"payload tractor_id {tractor_id!r} differs from topic's {topic_id!r}",
                       topic_id)
    seq = doc.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**63:
        return _reject("bad_seq", "seq must be a non-negative integer", tractor_id)
    samples = doc.get("samples")
    if not isinstance(samples, list) or not samples:
        return _reject("bad_samples", "samples must be a non-empty list", tractor_id, seq)
    if len(samples) > limits.max_samples:
        return _reject("too_many_samples", f"{len(samples)} samples > limit {limits.max_samples}", tractor_id, seq)
    verdict = Verdict(tractor_id=tractor_id, seq=seq)
    good: list[dict[str, Any]] = []
    earliest, latest = now - limits.max_age, now + limits.max_future_skew
    for index, raw in enumerate(samples):
        sample, problem = _check_sample(raw, earliest, latest, limits)
        if problem is not None:
            verdict.rejections.append(Rejection(problem.reason, problem.detail, index))
        else:
            good.append(sample)  # type: ignore[arg-type]
    if good:
        verdict.message = {"v": PAYLOAD_VERSION, "tractor_id": tractor_id, "seq": seq, "samples": good}
    return verdict


# Every reason code the validator can give (stable: dashboards and the DLQ readers rely on them).
REASONS: dict[str, str] = {
    "payload_too_large": "message bigger than the configured maximum",
    "bad_topic": "topic is not tractors/<tractor_id>/telemetry with a valid id",
    "empty_payload": "nothing (or only whitespace) in the payload",
    "bad_json": "not valid UTF-8 JSON (also absurdly deep nesting or giant integers)",
    "not_an_object": "JSON, but not an object",
    "unsupported_version": "v is not 1",
    "bad_tractor_id": "tractor_id missing or not 1-32 characters of A-Z a-z 0-9 _ -",
    "tractor_mismatch": "payload tractor_id differs from the id in the topic",
    "bad_seq": "seq missing or not a non-negative 64-bit integer",
    "bad_samples": "samples missing, not a list, or empty",
    "too_many_samples": "more samples than the configured maximum",
    "sample_not_object": "a sample is not a JSON object",
    "bad_timestamp": "a sample's ts is not an ISO-8601 timestamp with a UTC offset",
    "timestamp_in_future": "a sample's ts is ahead of the receive time by more than the allowed skew",
    "timestamp_too_old": "a sample's ts is older than the allowed age",
    "bad_engine_hours": "a sample's engine_hours is not a finite number in range",
    "bad_readings": "a sample's readings is not a non-empty object",
    "unknown_signal": "a reading names a signal outside the v1 contract",
    "bad_reading_type": "a reading is not a number",
    "non_finite_reading": "a reading is NaN, infinite or too large",
    "reading_out_of_range": "a reading is outside the signal's physically plausible range",
}

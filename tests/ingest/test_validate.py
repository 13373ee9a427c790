"""The v1 validator: reason codes, per-sample rejection, normalisation, never raising, simulator payloads pass."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.contract import SIGNALS
from ingest.validate import REASONS, Limits, validate

NOW = datetime(2026, 11, 27, 13, 0, tzinfo=UTC)
TOPIC = "tractors/T00042/telemetry"


def sample(ts: str = "2026-11-27T12:00:00.000Z", **readings: float) -> dict[str, object]:
    return {"ts": ts, "engine_hours": 1532.4, "readings": readings or {"oil_pressure_kpa": 312.5, "engine_rpm": 1800}}


def message(*samples: dict[str, object], tractor: str = "T00042", seq: int = 7) -> bytes:
    return json.dumps({"v": 1, "tractor_id": tractor, "seq": seq, "samples": list(samples) or [sample()]}).encode()


def test_valid_message_is_normalised() -> None:
    v = validate(TOPIC, message(sample(ts="2026-11-27T13:00:00+01:00", engine_rpm=1800)), NOW)
    assert v.rejections == []
    assert v.message == {"v": 1, "tractor_id": "T00042", "seq": 7, "samples": [
        {"ts": "2026-11-27T12:00:00.000Z", "engine_hours": 1532.4, "readings": {"engine_rpm": 1800.0}}]}


def test_one_bad_sample_rejects_only_that_sample() -> None:
    good, bad = sample(), sample(oil_pressure_kpa=-5.0)
    v = validate(TOPIC, message(good, bad, good), NOW)
    assert [s["ts"] for s in v.message["samples"]] == ["2026-11-27T12:00:00.000Z"] * 2
    assert [(r.reason, r.sample_index) for r in v.rejections] == [("reading_out_of_range", 1)]


@pytest.mark.parametrize(("topic", "payload", "reason"), [
    (TOPIC, b"", "empty_payload"),
    (TOPIC, b"   \n", "empty_payload"),
    (TOPIC, b"{not json", "bad_json"),
    (TOPIC, b"\xff\xfe\x00garbage", "bad_json"),
    (TOPIC, b"\xef\xbb\xbf" + message(), "bad_json"),  # UTF-8 byte order mark
    (TOPIC, message().decode().encode("utf-16"), "bad_json"),
    (TOPIC, b"[" * 100_000, "bad_json"),
    (TOPIC, b'{"v":1,"seq":' + b"9" * 5000 + b"}", "bad_json"),
    (TOPIC, b"[1, 2]", "not_an_object"),
    (TOPIC, b'"T00042"', "not_an_object"),
    (TOPIC, b'{"v":2,"tractor_id":"T00042","seq":1,"samples":[]}', "unsupported_version"),
    (TOPIC, b'{"v":true,"tractor_id":"T00042","seq":1,"samples":[]}', "unsupported_version"),
    (TOPIC, message(tractor="T00043"), "tractor_mismatch"),
    (TOPIC, message(tractor="T00042'; DROP TABLE orders;--"), "bad_tractor_id"),
    (TOPIC, message(tractor="T00042\n"), "bad_tractor_id"),
    (TOPIC, message(tractor="Tß042"), "bad_tractor_id"),
    (TOPIC, message(tractor="T+/#"), "bad_tractor_id"),
    ("tractors/Tß042/telemetry", message(), "bad_topic"),
    ("tractors//telemetry", message(), "bad_topic"),
    (TOPIC, message(seq=-1), "bad_seq"),
    (TOPIC, b'{"v":1,"tractor_id":"T00042","seq":"7","samples":[{}]}', "bad_seq"),
    (TOPIC, b'{"v":1,"tractor_id":"T00042","seq":7,"samples":[]}', "bad_samples"),
    (TOPIC, b'{"v":1,"tractor_id":"T00042","seq":7,"samples":{"a":1}}', "bad_samples"),
    (TOPIC, message(*[sample()] * 2001), "too_many_samples"),
    (TOPIC, b"x" * (256 * 1024 + 1), "payload_too_large"),
])
def test_message_level_rejections(topic: str, payload: bytes, reason: str) -> None:
    v = validate(topic, payload, NOW)
    assert v.message is None
    assert [r.reason for r in v.rejections] == [reason]
    assert reason in REASONS


@pytest.mark.parametrize(("raw", "reason"), [
    ("not an object", "sample_not_object"),
    ({"engine_hours": 1, "readings": {"engine_rpm": 1}}, "bad_timestamp"),
    (sample(ts="2026-11-27T12:00:00"), "bad_timestamp"),  # no offset
    (sample(ts="yesterday at noon, roughly"), "bad_timestamp"),
    (sample(ts="0001-01-01T00:30:00+01:00"), "bad_timestamp"),  # before year 1 in UTC
    (sample(ts="2026-11-27T13:06:00.000Z"), "timestamp_in_future"),
    (sample(ts="2024-01-01T00:00:00.000Z"), "timestamp_too_old"),
    ({**sample(), "engine_hours": "many"}, "bad_engine_hours"),
    ({**sample(), "engine_hours": -1}, "bad_engine_hours"),
    ({**sample(), "engine_hours": True}, "bad_engine_hours"),
    ({**sample(), "readings": {}}, "bad_readings"),
    ({**sample(), "readings": [1, 2]}, "bad_readings"),
    (sample(boost_pressure=1.0), "unknown_signal"),
    ({**sample(), "readings": {"engine_rpm": "1800"}}, "bad_reading_type"),
    ({**sample(), "readings": {"engine_rpm": None}}, "bad_reading_type"),
    ({**sample(), "readings": {"engine_rpm": False}}, "bad_reading_type"),
    (sample(engine_rpm=float("nan")), "non_finite_reading"),
    (sample(engine_rpm=float("inf")), "non_finite_reading"),
    ({**sample(), "readings": {"engine_rpm": 10**400}}, "non_finite_reading"),
    (sample(battery_v=240.0), "reading_out_of_range"),
])
def test_sample_level_rejections(raw: object, reason: str) -> None:
    v = validate(TOPIC, message(raw, sample()), NOW)  # the good sample next to it is still forwarded
    assert [(r.reason, r.sample_index) for r in v.rejections] == [(reason, 0)]
    assert v.message is not None and len(v.message["samples"]) == 1


def test_every_signal_accepts_its_plausible_range_ends() -> None:
    readings = {name: s.low for name, s in SIGNALS.items()}
    assert validate(TOPIC, message(sample(**readings)), NOW).rejections == []
    readings = {name: s.high for name, s in SIGNALS.items()}
    assert validate(TOPIC, message(sample(**readings)), NOW).rejections == []


def test_limits_come_from_configuration() -> None:
    tight = Limits(max_payload_bytes=100, max_samples=1, max_future_skew=timedelta(0), max_age=timedelta(hours=1))
    assert validate(TOPIC, message(sample(), sample()), NOW, tight).rejections[0].reason == "payload_too_large"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4),
    max_leaves=20,
)
readings_st = st.dictionaries(st.sampled_from([*SIGNALS, "bogus"]),
                              st.floats(allow_nan=True, allow_infinity=True) | st.integers() | json_values, max_size=14)
sample_st = st.fixed_dictionaries({}, optional={
    "ts": st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()) | st.text(max_size=40),
    "engine_hours": st.floats(allow_nan=True, allow_infinity=True) | st.integers() | json_values,
    "readings": readings_st | json_values,
}) | json_values
message_st = st.fixed_dictionaries({}, optional={
    "v": st.sampled_from([1, 1.0, 2, True, "1"]),
    "tractor_id": st.sampled_from(["T00042", "T00043", ""]) | st.text(max_size=40),
    "seq": st.integers() | json_values,
    "samples": st.lists(sample_st, max_size=5) | json_values,
})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=message_st, topic=st.sampled_from([TOPIC, "tractors/T00043/telemetry"]) | st.text(max_size=60))
def test_validator_never_raises_on_structured_junk(doc: dict[str, object], topic: str) -> None:
    payload = json.dumps(doc, allow_nan=True).encode()
    v = validate(topic, payload, NOW)
    assert v.message is not None or v.rejections  # every message is either forwarded or explained
    assert all(r.reason in REASONS for r in v.rejections)
    if v.message is not None:
        json.dumps(v.message, allow_nan=False)  # what goes to Kafka is strict JSON


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=2000), topic=st.text(max_size=60))
def test_validator_never_raises_on_bytes(payload: bytes, topic: str) -> None:
    v = validate(topic, payload, NOW)
    assert v.message is None or v.message["tractor_id"] == topic.split("/")[1]
    assert all(r.reason in REASONS for r in v.rejections)


# ---------------------------------------------------------------- whatever the simulator sends passes
def _simulated_run(scenario: str, tractors: int, days: float, period_s: float, seed: int) -> tuple[object, list]:
    from simulators.scenario import build, load

    fleet, days_, period = build(load(scenario), tractors=tractors, days=days, seed=seed, period_s=period_s)
    messages = [m for _, batch in fleet.run(days_, period) for m in batch]
    return fleet, messages


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=st.sampled_from(["oil-pump-demo", "mixed-wear", "sensor-faults", "healthy", "stress"]),
       tractors=st.integers(1, 5), days=st.floats(1.05, 3.0), period_s=st.sampled_from([300.0, 600.0, 1800.0]),
       seed=st.integers(0, 10_000))
def test_validator_accepts_every_simulated_payload(scenario: str, tractors: int, days: float, period_s: float,
                                                   seed: int) -> None:
    from ingest.contract import telemetry_topic
    from ingest.validate import format_ts

    fleet, messages = _simulated_run(scenario, tractors, days, period_s, seed)
    end_s = round(days * 86_400 / period_s) * period_s  # the last simulated step
    received = fleet.start + timedelta(seconds=end_s + 1)  # the accelerated run ends about now (start_for)
    rejected: set[tuple[str, str]] = set()
    for tractor_id, payload in messages:
        v = validate(telemetry_topic(tractor_id), payload, received)
        assert all(r.sample_index is not None for r in v.rejections), (v.rejections, payload[:300])
        samples = json.loads(payload)["samples"]
        rejected |= {(tractor_id, samples[r.sample_index]["ts"]) for r in v.rejections}
        assert {r.reason for r in v.rejections} <= {"reading_out_of_range", "non_finite_reading"}
    skew = fleet.network.clock_skew_s
    injected = {(fleet.ids[i], format_ts(fleet.start + timedelta(seconds=t + skew.get(i, 0.0))))
                for i, t in fleet.invalid_samples}
    assert rejected == injected  # only the samples the simulator made invalid on purpose are refused


# ---------------------------------------------------------------- the orjson fast path changes no verdict
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=message_st, big=st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True))
def test_fast_parser_gives_the_stdlib_verdict(doc: dict[str, object], big: object) -> None:
    for payload in (json.dumps(doc, allow_nan=True).encode(),
                    json.dumps({"v": 1, "tractor_id": "T00042", "seq": big, "samples": [sample(engine_rpm=big)]},
                               allow_nan=True).encode(),
                    json.dumps(doc, allow_nan=True).encode().replace(b'"v"', b'"\\ud800"')):
        assert validate(TOPIC, payload, NOW) == validate(TOPIC, payload, NOW, fast_loads=None)

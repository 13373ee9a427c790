"""Filter criteria: EventBridge-style patterns match the records Lambda's event filtering would."""

from __future__ import annotations

import pytest

from functions.filters import FilterError, RecordFilter


def doc(value: object, key: str | None = "T00001") -> dict[str, object]:
    return {"topic": "telemetry", "partition": 0, "offset": 7, "timestamp": 0, "key": key, "headers": {},
            "value": value}


@pytest.mark.parametrize(("pattern", "value", "expected"), [
    ({"value": {"kind": ["alert"]}}, {"kind": "alert"}, True),
    ({"value": {"kind": ["alert"]}}, {"kind": "info"}, False),
    ({"value": {"kind": ["alert", "warn"]}}, {"kind": "warn"}, True),
    ({"value": {"n": [5]}}, {"n": 5.0}, True),
    ({"value": {"n": [5]}}, {"n": "5"}, False),
    ({"value": {"tractor_id": [{"prefix": "T0"}]}}, {"tractor_id": "T00042"}, True),
    ({"value": {"tractor_id": [{"prefix": "T0"}]}}, {"tractor_id": "X00042"}, False),
    ({"value": {"file": [{"suffix": ".csv"}]}}, {"file": "a.csv"}, True),
    ({"value": {"s": [{"equals-ignore-case": "OK"}]}}, {"s": "ok"}, True),
    ({"value": {"kind": [{"anything-but": ["debug", "trace"]}]}}, {"kind": "alert"}, True),
    ({"value": {"kind": [{"anything-but": ["debug", "trace"]}]}}, {"kind": "debug"}, False),
    ({"value": {"kind": [{"anything-but": "debug"}]}}, {}, False),
    ({"value": {"kind": [{"anything-but": {"prefix": "de"}}]}}, {"kind": "debug"}, False),
    ({"value": {"rpm": [{"numeric": [">", 0, "<=", 1800]}]}}, {"rpm": 1800}, True),
    ({"value": {"rpm": [{"numeric": [">", 0, "<=", 1800]}]}}, {"rpm": 0}, False),
    ({"value": {"rpm": [{"numeric": [">=", 10]}]}}, {"rpm": "20"}, False),
    ({"value": {"rpm": [{"numeric": ["=", 3]}]}}, {"rpm": 3}, True),
    ({"value": {"err": [{"exists": True}]}}, {"err": None}, True),
    ({"value": {"err": [{"exists": True}]}}, {}, False),
    ({"value": {"err": [{"exists": False}]}}, {}, True),
    ({"value": {"err": [{"exists": False}]}}, {"err": 1}, False),
    ({"value": {"a": {"b": [1]}}}, {"a": {"b": 1}}, True),
    ({"value": {"a": {"b": [1]}}}, {"a": {"b": 2}}, False),
    ({"value": {"a": {"b": [{"exists": False}]}}}, {}, True),
    ({"value": {"tags": ["x"]}}, {"tags": ["y", "x"]}, True),
    ({"value": {"tags": ["x"]}}, {"tags": []}, False),
    ({"value": {"v": [None]}}, {"v": None}, True),
    ({"key": [{"prefix": "T0"}], "value": {"kind": ["alert"]}}, {"kind": "alert"}, True),
    ({"key": [{"prefix": "Z"}], "value": {"kind": ["alert"]}}, {"kind": "alert"}, False),
    ({"value": {"kind": ["alert"]}}, "plain text", False),
    ({"value": ["plain text"]}, "plain text", True),
])
def test_pattern_matches_like_eventbridge(pattern: dict[str, object], value: object, expected: bool) -> None:
    assert RecordFilter([pattern]).matches(doc(value)) is expected


def test_any_pattern_may_match_and_no_patterns_match_everything() -> None:
    f = RecordFilter([{"value": {"k": [1]}}, '{"value": {"k": [2]}}'])
    assert f.matches(doc({"k": 2})) and not f.matches(doc({"k": 3}))
    assert RecordFilter([]).matches(doc({"k": 3}))


@pytest.mark.parametrize(("pattern", "message"), [
    ({"value": {"n": [{"numeric": [">>", 1]}]}}, "numeric"),
    ({"value": {"n": [{"numeric": [">", "1"]}]}}, "numeric"),
    ({"value": {"n": [{"wildcard": "x*"}]}}, "unknown matcher"),
    ({"value": {"n": []}}, "non-empty list"),
    ({"value": {"n": "x"}}, "non-empty list"),
    ({"value": {"n": [{"prefix": "a", "suffix": "b"}]}}, "exactly one key"),
    ("{not json", "not valid JSON"),
    ({}, "empty pattern"),
])
def test_bad_patterns_are_rejected_with_the_place_named(pattern: object, message: str) -> None:
    with pytest.raises(FilterError, match=message):
        RecordFilter([pattern])  # type: ignore[list-item]

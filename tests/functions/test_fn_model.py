"""A record's JSON value decodes exactly as the stdlib parser decodes it (orjson is only a speed-up)."""

from __future__ import annotations

import json

import pytest

from functions.model import Record, build_event, json_values, loads_json

TEXTS = [b'{"v":1,"tractor_id":"T00001","seq":3,"samples":[{"ts":"2026-01-01T00:00:00Z","readings":{"a":1.5}}]}',
         b'{"a":NaN,"b":Infinity,"c":-Infinity}', b"1e400", b'{"a":1,"a":2}', b'"\\ud800"',
         b"123456789012345678901234567890", b"-9223372036854775809", b"18446744073709551615", b"\xef\xbb\xbf{}",
         b'{"seq":98765432109876543210,"x":1.5}', b'[-12345678901234567890, 7]',
         '{"x": [1, 2]}'.encode("utf-16"), b" [0.1, -0.0, 5e-324] ", "{\"ü\": \"ß\"}".encode()]


@pytest.mark.parametrize("raw", TEXTS)
def test_loads_json_matches_the_stdlib(raw: bytes) -> None:
    assert repr(loads_json(raw)) == repr(json.loads(raw))


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"\xff\xfe\x00", b"[1,]"])
def test_a_record_that_is_not_json_decodes_to_none(raw: bytes) -> None:
    assert Record("t", 0, 0, 0, None, raw).json() is None


def test_json_values_decodes_runtime_records_and_reads_plain_dicts() -> None:
    recs = [Record("t", 0, 0, 0, None, b'{"a": 1}'), Record("t", 0, 1, 0, None, b"nope"),
            Record("t", 1, 0, 0, None, b"[1, 2]")]
    event = build_event(recs)
    records = [r for run in event["records"].values() for r in run]
    assert json_values(records) == [{"a": 1}, None, [1, 2]]
    assert records[0]["json"] == {"a": 1}  # the lazy field still works afterwards
    assert json_values([{"json": {"b": 2}}, {"topic": "t"}]) == [{"b": 2}, None]

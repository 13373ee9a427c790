"""The state column's encoding: what is stored reads back exactly as the stdlib JSON column stored and read it."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select, text

from trends.tables import decode_state, encode_state, trend_state

AWKWARD: list[Any] = [
    {"wm": 1.5, "dd": [60, "//8A"], "open": None},
    {"sigma": math.nan, "lo": -math.inf, "hi": math.inf, "zero": -0.0},  # orjson would write these as null
    {1: "int key", 2.5: "float key", None: "none key", False: "bool key"},  # non-str keys become strings
    {"pair": (1, 2), "nested": [(3, [4, (5,)])]},  # tuples become lists
    {"big": 2 ** 70, "neg": -(2 ** 64), "tiny": 5e-324, "huge": 1.7976931348623157e308},
    {"text": "ünïcödé \u2028 \ud800", "empty": {}, "list": []},
    [0.1, 1e-7, 123456789.123456789, 1e22, -1e-300],
    # None values next to NaN and infinity where counting the dicts' Nones alone would not see them
    {"base": None, "hist": [[1.0, math.nan]], "sig": {"x": {"level": None, "S": [math.inf, None]}}},
    {"trend": [None, 1.0], "sigma": math.nan, "name": "null"},
]


@pytest.mark.parametrize("value", AWKWARD)
def test_a_state_reads_back_as_the_stdlib_encoder_would_have_stored_it(value: Any) -> None:
    expected = json.loads(json.dumps(value))
    got = decode_state(encode_state(value))
    assert json.dumps(got) == json.dumps(expected)  # NaN never equals itself: compare the texts


def test_rows_written_by_the_plain_json_column_still_load_and_new_rows_match_them(tmp_path: Path) -> None:
    from fleetwatch.db import upgrade
    from functions.db import make_engine

    url = f"sqlite:///{tmp_path / 's.db'}"
    upgrade(url)
    engine = make_engine(url)
    old = {"sig": {"oil": {"sigma": math.nan, "S": [1.0, -0.0], "hist": [[1.25, 3.5]]}}, "episodes": {}}
    with engine.begin() as conn:
        # As the stdlib-encoded JSON column wrote it before (NaN as a bare literal).
        conn.execute(text("INSERT INTO trend_state (tractor_id, state, live, updated_at, generation) "
                          "VALUES ('T1', :s, NULL, '2026-01-01 00:00:00.000000', 0)"), {"s": json.dumps(old)})
        conn.execute(insert(trend_state), [{"tractor_id": "T2", "state": old, "live": {"wm": 2.0},
                                            "updated_at": datetime(2026, 1, 1), "generation": 1}])
        rows = dict(conn.execute(select(trend_state.c.tractor_id, trend_state.c.state)).all())
        live = conn.execute(select(trend_state.c.live).where(trend_state.c.tractor_id == "T2")).scalar_one()
    engine.dispose()
    assert json.dumps(rows["T1"]) == json.dumps(rows["T2"]) == json.dumps(old)
    assert live == {"wm": 2.0}

"""Hostile input to every parser: each either succeeds or raises the project's own clear error, never anything else.

Documents are the shipped, valid files with hypothesis-chosen damage: a value replaced by any TOML value, a key
dropped, a table replaced, or raw text spliced in. What a parser accepts must also be usable by the next step
(a scenario builds, a catalog drives the simulator and seeds a database).
"""

from __future__ import annotations

import json
import math
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetwatch.db import CATALOG, CatalogError, load_catalog
from fleetwatch.settings import Settings
from functions.config import ConfigError, load_functions
from ingest.contract import telemetry_topic
from ingest.validate import Limits, validate
from simulators.scenario import SCENARIO_DIR, ScenarioError, build, load

FUNCTIONS_FILE = Settings().functions_path
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                database=None)
NOW = datetime(2026, 11, 27, 13, 0, tzinfo=UTC)


# ------------------------------------------------------------------ a small TOML writer for generated documents
def _key(k: str) -> str:
    return k if k and all(c.isalnum() and c.isascii() or c in "-_" for c in k) else json.dumps(k, ensure_ascii=False)


def _value(v: Any) -> str:  # noqa: ANN401
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        text = repr(v)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(doc: dict[str, Any]) -> str:
    """TOML text for a document: scalars and inline tables at the top, arrays of tables as [[name]]."""
    lines = []
    tables = []
    for k, v in doc.items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables.append((k, v))
        else:
            lines.append(f"{_key(k)} = {_value(v)}")
    for k, entries in tables:
        for entry in entries:
            lines.append(f"[[{_key(k)}]]")
            lines += [f"{_key(ek)} = {_value(ev)}" for ek, ev in entry.items()]
    return "\n".join(lines) + "\n"


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
SCALARS = st.one_of(st.booleans(), st.integers(min_value=-2**63, max_value=2**63 - 1), st.floats(), TEXT,
                    st.datetimes(timezones=st.just(UTC)))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(TEXT, inner, max_size=4)), max_leaves=8)


@st.composite
def damaged(draw: st.DrawFn, original: dict[str, Any]) -> dict[str, Any]:
    """``original`` with one to three hypothesis-chosen changes somewhere in its tree."""
    doc = json.loads(json.dumps(original, default=str))
    for _ in range(draw(st.integers(1, 3))):
        node: Any = doc
        path = []
        while isinstance(node, dict | list) and node and draw(st.booleans()):
            key = draw(st.sampled_from(list(node) if isinstance(node, dict) else list(range(len(node)))))
            path.append((node, key))
            node = node[key]
        if not path:
            doc[draw(TEXT)] = draw(VALUES)
            continue
        parent, key = path[-1]
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "replace":
            parent[key] = draw(VALUES)
        elif action == "drop" and isinstance(parent, dict):
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(TEXT)] = draw(VALUES)
        else:
            parent.append(draw(VALUES))
    return doc


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ function configuration
@FUZZ
@given(doc=damaged(tomllib.loads(FUNCTIONS_FILE.read_text())))
def test_function_config_gives_config_error_or_functions(doc: dict[str, Any], tmp_path_factory: Any) -> None:
    path = _write(tmp_path_factory.mktemp("fn"), "functions.toml", to_toml(doc))
    try:
        functions = load_functions(path)
    except ConfigError as exc:
        assert str(exc).startswith(str(path))
        return
    assert all(fn.source_topics and fn.batch_size >= 1 for fn in functions.values())


@FUZZ
@given(text=st.text(max_size=300), cut=st.integers(0, 4000))
def test_function_config_survives_spliced_text(text: str, cut: int, tmp_path_factory: Any) -> None:
    original = FUNCTIONS_FILE.read_text()
    path = _write(tmp_path_factory.mktemp("fn"), "functions.toml", original[:cut] + text + original[cut:])
    try:
        load_functions(path)
    except ConfigError:
        pass


def test_a_missing_function_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_functions(tmp_path / "missing.toml")


def test_a_function_config_path_that_is_a_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_functions(tmp_path)


# ------------------------------------------------------------------ parts catalog
@FUZZ
@given(doc=damaged(tomllib.loads(CATALOG.read_text())))
def test_catalog_gives_catalog_error_or_a_catalog_the_simulator_can_use(doc: dict[str, Any],
                                                                      tmp_path_factory: Any) -> None:
    path = _write(tmp_path_factory.mktemp("cat"), "catalog.toml", to_toml(doc))
    try:
        parts = load_catalog(path)
    except CatalogError:
        return
    try:  # an accepted catalog must drive the simulator, or the simulator says what is wrong with it
        build(load("oil-pump-demo"), tractors=2, days=0.1, seed=1, catalog=parts)
    except (ScenarioError, CatalogError):
        pass


@FUZZ
@given(text=st.text(max_size=300), cut=st.integers(0, 6000))
def test_catalog_survives_spliced_text(text: str, cut: int, tmp_path_factory: Any) -> None:
    original = CATALOG.read_text()
    path = _write(tmp_path_factory.mktemp("cat"), "catalog.toml", original[:cut] + text + original[cut:])
    try:
        load_catalog(path)
    except CatalogError:
        pass


# ------------------------------------------------------------------ scenario files
SCENARIOS = sorted(SCENARIO_DIR.glob("*.toml"))


@FUZZ
@given(data=st.data(), which=st.sampled_from(SCENARIOS))
def test_scenario_gives_scenario_error_or_a_fleet(data: st.DataObject, which: Path, tmp_path_factory: Any) -> None:
    doc = data.draw(damaged(tomllib.loads(which.read_text())))
    path = _write(tmp_path_factory.mktemp("sc"), "scenario.toml", to_toml(doc))
    try:
        sc = load(path)
        fleet, days, period = build(sc, tractors=min(sc.tractors, 3), days=min(sc.days, 0.2), period_s=1800,
                                    catalog=load_catalog(CATALOG))
    except ScenarioError as exc:
        assert str(exc)
        return
    assert fleet.n >= 1 and days > 0 and period > 0


@FUZZ
@given(text=st.text(max_size=300), cut=st.integers(0, 3000), which=st.sampled_from(SCENARIOS))
def test_scenario_survives_spliced_text(text: str, cut: int, which: Path, tmp_path_factory: Any) -> None:
    original = which.read_text()
    path = _write(tmp_path_factory.mktemp("sc"), "scenario.toml", original[:cut] + text + original[cut:])
    try:
        load(path)
    except ScenarioError:
        pass


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "oil-pump-demo'; DROP TABLE orders;--", "/tmp",
                                  "nul\x00byte", "a/b", "/proc/self/environ", "x" * 5000 + ".toml", "x" * 5000])
def test_scenario_names_that_are_paths_or_injections_are_scenario_errors(name: str) -> None:
    with pytest.raises(ScenarioError):
        load(name)


# ------------------------------------------------------------------ telemetry payloads
def _nested(depth: int) -> bytes:
    return b'{"v":1,"tractor_id":"T00001","seq":1,"samples":' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("payload,reason", [
    (_nested(100_000), "bad_json"),
    (b'{"a":' * 20_000 + b"1" + b"}" * 20_000, "bad_json"),
    (b"9" * 100_000, "bad_json"),  # an integer of 100,000 digits
    (b"9" * 300_000, "payload_too_large"),
    (b'{"v":1,"tractor_id":"T00001","seq":1' + b" " * 300_000 + b"}", "payload_too_large"),
    (b'{"v":1,"tractor_id":"T00001","seq":' + b"9" * 5000 + b',"samples":[]}', "bad_json"),
    (json.dumps({"v": 1, "tractor_id": "T00001", "seq": 1, "samples": [{"ts": "2026-11-27T12:00:00Z",
                 "engine_hours": 1, "readings": {"oil_pressure_kpa": 1e308 * 10}}]}).encode(), "non_finite_reading"),
    (json.dumps({"v": 1, "tractor_id": "T00001", "seq": 1, "samples": [{"ts": "2026-11-27T12:00:00Z",
                 "engine_hours": 1, "readings": {"oil_pressure_kpa": [[[[1]]]]}}]}).encode(), "bad_reading_type"),
    (json.dumps({"v": 1, "tractor_id": "T00001' OR '1'='1", "seq": 1, "samples": []}).encode(), "bad_tractor_id"),
    (json.dumps({"v": 1, "tractor_id": "../../etc", "seq": 1, "samples": []}).encode(), "bad_tractor_id"),
])
def test_hostile_payloads_get_a_reason_instead_of_an_exception(payload: bytes, reason: str) -> None:
    verdict = validate("tractors/T00001/telemetry", payload, NOW, Limits())
    assert verdict.message is None
    assert [r.reason for r in verdict.rejections] == [reason]


@FUZZ
@given(doc=st.recursive(SCALARS.filter(lambda v: not isinstance(v, datetime)),
                        lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                st.dictionaries(st.sampled_from(["v", "tractor_id", "seq", "samples",
                                                                                 "ts", "engine_hours", "readings",
                                                                                 "oil_pressure_kpa"]) | TEXT,
                                                                inner, max_size=6)), max_leaves=30))
def test_validator_never_raises_on_any_json_document(doc: Any) -> None:  # noqa: ANN401
    verdict = validate("tractors/T00001/telemetry", json.dumps(doc, default=str).encode(), NOW)
    assert verdict.message is not None or verdict.rejections


# ------------------------------------------------------------------ CSV replay: mapping file and CSV content
REPLAY_CSV = """unit,when,oil_psi,coolant_F,rpm,hours
7,2026-11-01T08:00:00Z,46.41,190.4,1800,1200.5
7,2026-11-01T08:10:00Z,45.00,191.0,1810,1200.67
12,2026-11-01 08:00:00,40.00,200.0,1700,88
"""
REPLAY_MAP = {
    "samples_per_message": 1,
    "entity": {"column": "unit", "format": "T{:05d}"},
    "time": {"column": "when"},
    "engine_hours": {"column": "hours"},
    "signals": {"oil_pressure_kpa": {"column": "oil_psi", "unit": "psi"},
                "coolant_temp_c": {"column": "coolant_F", "unit": "degF"}, "engine_rpm": {"column": "rpm"}},
}


def _toml_nested(doc: dict[str, Any], prefix: str = "") -> str:
    """TOML for a mapping document: scalars first, then each sub-table as [a.b]."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for k, v in doc.items():
        if isinstance(v, dict):
            name = f"{prefix}.{_key(k)}" if prefix else _key(k)
            lines.append(f"[{name}]")
            lines.append(_toml_nested(v, name))
    return "\n".join(lines) + "\n"


def _replay_or_error(csv_text: str, mapping_text: str, folder: Path) -> None:
    from simulators.replay import Replay, ReplayError, load_mapping

    csv_path = _write(folder, "data.csv", csv_text)
    try:
        replay = Replay(csv_path, load_mapping(_write(folder, "map.toml", mapping_text)), now=NOW)
        produced = list(replay.messages())
    except ReplayError as exc:
        assert str(exc)
        return
    for tractor_id, payload in produced:  # whatever a replay accepts, ingest accepts too
        verdict = validate(telemetry_topic(tractor_id), payload, NOW)
        assert verdict.message is not None and not verdict.rejections, (payload[:200], verdict.rejections[:2])


@FUZZ
@given(doc=damaged(REPLAY_MAP))
def test_csv_mapping_gives_replay_error_or_valid_telemetry(doc: dict[str, Any], tmp_path_factory: Any) -> None:
    _replay_or_error(REPLAY_CSV, _toml_nested(doc), tmp_path_factory.mktemp("map"))


@FUZZ
@given(rows=st.lists(st.lists(st.one_of(st.text(max_size=12), st.floats().map(str), st.integers().map(str),
                                        st.sampled_from(["2026-11-01T08:00:00Z", "nan", "inf", "", "-1e308"])),
                              min_size=0, max_size=8), max_size=6),
       header=st.booleans())
def test_csv_content_gives_replay_error_or_valid_telemetry(rows: list[list[str]], header: bool,
                                                           tmp_path_factory: Any) -> None:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    if header:
        writer.writerow(["unit", "when", "oil_psi", "coolant_F", "rpm", "hours"])
    writer.writerows(rows)
    _replay_or_error(buf.getvalue(), _toml_nested(REPLAY_MAP), tmp_path_factory.mktemp("csv"))

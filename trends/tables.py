"""Trend tables: closed event-time windows, latest part health, and the detector's persisted state."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson
from sqlalchemy import JSON, BigInteger, Column, DateTime, Dialect, Float, Index, Integer, MetaData, String, Table
from sqlalchemy.types import TypeDecorator

from functions.model import loads_json

metadata = MetaData()

def _nones(d: dict[Any, Any]) -> int:
    """How many values of ``d`` and of the dicts nested in it (not in lists) are None."""
    n = 0
    for v in d.values():
        if v is None:
            n += 1
        elif isinstance(v, dict):
            n += _nones(v)
    return n


def encode_state(value: Any) -> str:
    """JSON text of a state, as the stdlib encoder would give it in value, several times faster.

    orjson writes what it can; whenever its text would not read back as ``value`` (NaN or infinity, which orjson
    writes as null; non-str keys and types it refuses, which it raises on) the stdlib encoder writes it, exactly
    as before. The common case is proved without reading the text back: every NaN or infinity adds a ``null`` to
    the text beyond the None values counted in the state's dicts, so as many ``null`` as counted Nones means
    there is none (anything uncounted, a None in a list or a "null" in a string, only sends it to the full check).
    Tuples come out as lists, as from the stdlib encoder.
    """
    try:
        text = orjson.dumps(value)
        if (isinstance(value, dict) and text.count(b"null") == _nones(value)) or orjson.loads(text) == value:
            return text.decode()
    except (TypeError, orjson.JSONDecodeError):
        pass
    return json.dumps(value)


def decode_state(text: str | bytes) -> Any:
    """A state from its JSON text, as ``json.loads`` reads it (orjson unless the text needs the stdlib parser)."""
    return loads_json(text)


class StateJSON(TypeDecorator[Any]):
    """JSON column of the detector's state: same storage and values as ``JSON``, encoded by ``encode_state``.

    SQLite gets the text directly; psycopg gets its ``Json`` wrapper with ``encode_state`` as the encoder. Other
    drivers keep SQLAlchemy's own JSON handling.
    """

    impl = JSON
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        """Encode with ``encode_state`` where the driver takes text (SQLite) or an encoder (psycopg)."""
        if dialect.name == "sqlite":
            return encode_state
        if dialect.name == "postgresql" and dialect.driver == "psycopg":
            from psycopg.types.json import Json

            return lambda value: Json(value, dumps=encode_state)
        return super().bind_processor(dialect)

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any] | None:
        """Decode SQLite's text with ``decode_state``; other drivers decode as before."""
        if dialect.name == "sqlite":
            return lambda value: None if value is None else decode_state(value)
        return super().result_processor(dialect, coltype)

trend_windows = Table(
    "trend_windows", metadata,
    Column("tractor_id", String(32), primary_key=True),
    Column("signal", String(64), primary_key=True),
    Column("window_start", DateTime(timezone=True), primary_key=True),
    Column("window_end", DateTime(timezone=True), nullable=False),
    Column("count", Integer, nullable=False),
    Column("mean", Float, nullable=False),
    Column("min", Float, nullable=False),
    Column("max", Float, nullable=False),
    Column("std", Float, nullable=False),
    Column("n_used", Integer, nullable=True),  # samples inside the operating band that fed the trend (0002)
    Column("norm_value", Float, nullable=True),
    Column("level", Float, nullable=True),  # trend line's value at this window (0002)
    Column("slope_per_h", Float, nullable=True),
    Column("slope_lo", Float, nullable=True),
    Column("slope_hi", Float, nullable=True),
    Column("quality_flags", String(64), nullable=False, default=""),
    Index("ix_trend_windows_signal_start", "signal", "window_start"),
    # Fleet-wide time slices (0002); on PostgreSQL a BRIN index on window_end is added by the migration.
    Index("ix_trend_windows_start", "window_start"),
)

part_health = Table(
    "part_health", metadata,
    Column("tractor_id", String(32), primary_key=True),
    Column("part_id", String(64), primary_key=True),
    Column("signal", String(64), nullable=False),
    Column("level", Float, nullable=False),
    Column("health", Float, nullable=False),  # 1 = as new, 0 = at the failure threshold
    Column("slope_per_h", Float, nullable=True),
    Column("ttf_h", Float, nullable=True),
    Column("ttf_lo_h", Float, nullable=True),
    Column("ttf_hi_h", Float, nullable=True),  # 0002
    Column("episode_id", String(128), nullable=True),  # 0002
    Column("status", String(16), nullable=False),  # ok | warning | alert
    Column("as_of", DateTime(timezone=True), nullable=False),
    Index("ix_part_health_health", "health"),
    Index("ix_part_health_status_health", "status", "health"),  # 0002
)

trend_state = Table(
    "trend_state", metadata,
    Column("tractor_id", String(32), primary_key=True),  # or "~<partition>" for a partition's progress
    Column("state", StateJSON, nullable=False),  # trends, regression, episodes: rewritten when a window closes
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("live", StateJSON, nullable=True),  # watermark, dedupe bitmap, open windows: rewritten every batch (0003)
    # Random token set on every write: a worker's cached copy is current while the tokens match (0003).
    Column("generation", BigInteger, nullable=False, server_default="0"),
)

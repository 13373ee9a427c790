"""Database wiring: Alembic migrations over every package's tables, and catalog seeding."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.config import Config
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Engine, MetaData, insert, select, update

from functions import store
from functions.db import make_engine
from ordering import tables as ordering_tables
from trends import tables as trend_tables

MIGRATIONS = Path(__file__).with_name("migrations")
CATALOG = Path(ordering_tables.__file__).with_name("catalog.toml")
METADATA: list[MetaData] = [store.metadata, ordering_tables.metadata, trend_tables.metadata]


class CatalogError(ValueError):
    """A parts catalog file that cannot be loaded."""


def alembic_config(url: str) -> Config:
    """Alembic configuration pointing at the packaged migrations and ``url``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str) -> None:
    """Bring the schema to the newest migration and seed the parts catalog."""
    command.upgrade(alembic_config(url), "heads")
    engine = make_engine(url)
    try:
        seed_catalog(engine, load_catalog(CATALOG))
    finally:
        engine.dispose()


class CatalogPart(BaseModel):
    """One catalog part; keys beyond these (e.g. ``normalise_by``) are kept for the trend detector."""

    model_config = ConfigDict(extra="allow")

    part_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    name: str = Field(min_length=1, max_length=200)
    signal: str = Field(min_length=1, max_length=64)
    direction: Literal["falling", "rising"]
    nominal: float
    warning_threshold: float
    failure_threshold: float
    lead_time_h: float = Field(ge=0)
    price_eur: float = Field(ge=0)


def load_catalog(path: Path) -> list[dict[str, Any]]:
    """Parts from a catalog TOML file, validated; raises CatalogError naming the problem."""
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"{path}: {exc}") from exc
    parts = doc.get("part")
    if not isinstance(parts, list) or not parts:
        raise CatalogError(f"{path}: expected [[part]] tables")
    checked: list[dict[str, Any]] = []
    for i, raw in enumerate(parts):
        if not isinstance(raw, dict):
            raise CatalogError(f"{path}: part #{i + 1} is not a table")
        try:
            part = CatalogPart.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'part'}: {e['msg']}" for e in exc.errors())
            raise CatalogError(f"{path}: part #{i + 1}: {problems}") from exc
        checked.append(part.model_dump())
    ids = [p["part_id"] for p in checked]
    if len(set(ids)) != len(ids):
        raise CatalogError(f"{path}: part_id values must be unique")
    return checked


def seed_catalog(engine: Engine, parts: list[dict[str, Any]]) -> None:
    """Insert or update catalog parts (idempotent)."""
    table = ordering_tables.parts
    columns = {c.name for c in table.columns}
    with engine.begin() as conn:
        for p in parts:
            values = {k: v for k, v in p.items() if k in columns}
            values["extra"] = {k: v for k, v in p.items() if k not in columns} or None
            exists = conn.execute(select(table.c.part_id).where(table.c.part_id == p["part_id"])).first()
            if exists:
                conn.execute(update(table).where(table.c.part_id == p["part_id"]).values(**values))
            else:
                conn.execute(insert(table).values(**values))

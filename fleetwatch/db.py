"""Database wiring: Alembic migrations over every package's tables, and catalog seeding."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
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


REQUIRED = ("part_id", "name", "signal", "direction", "nominal", "warning_threshold", "failure_threshold",
            "lead_time_h", "price_eur")


def load_catalog(path: Path) -> list[dict[str, Any]]:
    """Parts from a catalog TOML file, validated."""
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"{path}: {exc}") from exc
    parts = doc.get("part")
    if not isinstance(parts, list) or not parts:
        raise CatalogError(f"{path}: expected [[part]] tables")
    for i, p in enumerate(parts):
        missing = [k for k in REQUIRED if k not in p]
        if missing:
            raise CatalogError(f"{path}: part #{i + 1} misses {', '.join(missing)}")
        if p["direction"] not in ("falling", "rising"):
            raise CatalogError(f"{path}: part {p['part_id']}: direction must be falling or rising")
    return parts


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

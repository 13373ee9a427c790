"""Fixtures for the ordering tests: a migrated SQLite database with a small fleet, orders and tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from ordering_fixtures import Api, make_tokens, seed_fleet
from sqlalchemy.orm import Session, sessionmaker

from fleetwatch.db import upgrade
from functions.db import make_engine, make_sessions
from ordering.api import create_app


@pytest.fixture()
def seeded_db(tmp_path: Path) -> Iterator[tuple[str, sessionmaker[Session]]]:
    """A migrated SQLite database with the catalog, a small fleet and three orders."""
    url = f"sqlite:///{tmp_path / 'orders.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessions(engine)
    seed_fleet(sessions)
    yield url, sessions
    engine.dispose()


@pytest.fixture()
def api(seeded_db: tuple[str, sessionmaker[Session]]) -> Iterator[Api]:
    """The REST API over the seeded database."""
    url, sessions = seeded_db
    with TestClient(create_app(sessions)) as client:
        yield Api(client, sessions, url, make_tokens(sessions))


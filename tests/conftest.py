"""Shared fixtures: the real local stack, started through fleetwatch.stack like ``make demo`` does."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetwatch.settings import PROJECT_ROOT, Settings

# Tests get their own run folder and ports, so they never disturb a running demo. A value already set in
# the environment wins, so two checkouts (or two developers) can run the suite side by side.
TEST_DEFAULTS = {
    "FLEETWATCH_RUN_DIR": str(PROJECT_ROOT / ".run" / "test"),
    "FLEETWATCH_KAFKA_PORT": "19092",
    "FLEETWATCH_KAFKA_CONTROLLER_PORT": "19093",
    "FLEETWATCH_MQTT_PORT": "11883",
    "FLEETWATCH_PG_PORT": "55433",
    "FLEETWATCH_API_PORT": "18080",
    "FLEETWATCH_MQTT_SESSION_EXPIRY_S": "600",
}
ARTIFACTS = PROJECT_ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def services() -> Iterator[Settings]:
    """Kafka, Mosquitto and PostgreSQL running for the whole test session; stopped afterwards."""
    from fleetwatch.stack import Stack

    saved = {k: os.environ.get(k) for k in TEST_DEFAULTS}
    for key, value in TEST_DEFAULTS.items():
        os.environ.setdefault(key, value)
    settings = Settings()
    stack = Stack(settings)
    stack.ensure_debian_packages()
    stack.down()  # a previous interrupted run may have left its supervisord behind
    stack.start(["kafka", "mosquitto", "postgres"])
    try:
        yield settings
    finally:
        stack.down()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def isolated(services: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings with a fresh topic prefix so each test sees only its own records."""
    prefix = f"t{uuid.uuid4().hex[:8]}-"
    monkeypatch.setenv("FLEETWATCH_TOPIC_PREFIX", prefix)
    return Settings()


@pytest.fixture()
def pg_url(services: Settings) -> str:
    """URL of a brand-new, empty PostgreSQL database on the test server."""
    import psycopg

    name = f"fw_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"host=127.0.0.1 port={services.pg_port} user={services.pg_user} dbname=postgres",
                         autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://{services.pg_user}@127.0.0.1:{services.pg_port}/{name}"


@pytest.fixture()
def artifacts() -> Path:
    """Folder for files a test leaves for humans (screenshots, reports)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS

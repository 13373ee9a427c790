"""``fleetwatch tokens`` and ``fleetwatch orders`` on a real SQLite database."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from fleetwatch.cli import app
from fleetwatch.cli_orders import demo_token_path, ensure_demo_token
from fleetwatch.settings import Settings
from ordering.auth import authenticate
from ordering.tables import api_tokens, orders

Db = tuple[str, sessionmaker[Session]]
runner = CliRunner()


@pytest.fixture()
def env(seeded_db: Db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> sessionmaker[Session]:
    url, sessions = seeded_db
    monkeypatch.setenv("FLEETWATCH_DATABASE_URL", url)
    monkeypatch.setenv("FLEETWATCH_RUN_DIR", str(tmp_path / "run"))
    return sessions


def test_tokens_create_prints_a_working_secret_stored_only_hashed(env: sessionmaker[Session]) -> None:
    result = runner.invoke(app, ["tokens", "create", "--role", "analyst", "--name", "notebook"])
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip().splitlines()[0]
    with env() as s:
        who = authenticate(s, secret)
        assert who is not None and (who.role, who.name) == ("analyst", "notebook")
        assert secret not in {r.token_hash for r in s.execute(select(api_tokens))}
    listed = runner.invoke(app, ["tokens", "list"])
    assert "notebook" in listed.stdout and secret not in listed.stdout
    assert runner.invoke(app, ["tokens", "revoke", str(who.token_id)]).exit_code == 0
    with env() as s:
        assert authenticate(s, secret) is None


def test_tokens_create_refuses_an_unknown_role(env: sessionmaker[Session]) -> None:
    result = runner.invoke(app, ["tokens", "create", "--role", "root"])
    assert result.exit_code == 2 and "operator, analyst, admin" in result.output


def test_orders_lifecycle_from_the_cli(env: sessionmaker[Session]) -> None:
    assert runner.invoke(app, ["orders", "ack", "1"]).exit_code == 0
    bad = runner.invoke(app, ["orders", "install", "1"])
    assert bad.exit_code == 1 and "acknowledged; it cannot become installed" in bad.output
    assert runner.invoke(app, ["orders", "cancel", "2", "--reason", "vibration from a loose guard",
                               "--code", "false_alarm"]).exit_code == 0
    with env() as s:
        got = {r.id: r.status for r in s.execute(select(orders))}
    assert got == {1: "acknowledged", 2: "cancelled", 3: "placed"}
    shown = runner.invoke(app, ["orders", "show", "1"])
    assert shown.exit_code == 0 and '"acknowledged"' in shown.stdout
    assert runner.invoke(app, ["orders", "show", "99"]).exit_code == 1
    listed = runner.invoke(app, ["orders", "list", "--status", "placed", "--format", "csv"])
    assert listed.stdout.count("\n") == 2 and "T00003" in listed.stdout


def test_demo_token_is_kept_private_and_reused(env: sessionmaker[Session]) -> None:
    s = Settings()
    first = ensure_demo_token(s, env)
    assert stat.S_IMODE(demo_token_path(s).stat().st_mode) == 0o600
    assert ensure_demo_token(s, env) == first
    with env() as session:
        assert authenticate(session, first).role == "operator"  # type: ignore[union-attr]

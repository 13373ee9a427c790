"""Kafka cluster ids the stack generates are always accepted by kafka-storage."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetwatch.settings import Settings
from fleetwatch.stack import Stack, new_cluster_id


def test_cluster_ids_never_start_with_a_dash() -> None:
    ids = {new_cluster_id() for _ in range(3000)}  # ~1 in 64 random ids would start with '-'
    assert len(ids) == 3000
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)


def test_a_stored_id_with_a_leading_dash_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stack = Stack(Settings(run_dir=tmp_path))
    monkeypatch.setattr(stack, "kafka_libs", lambda: tmp_path / "libs")
    kafka = tmp_path / "kafka"
    (kafka / "data").mkdir(parents=True)
    (kafka / "data" / "meta.properties").write_text("")  # already formatted: no kafka-storage run here
    (kafka / "cluster.id").write_text("-Z4ixQtrSUWsJmgW6VYMvQ\n")
    stack._kafka_programs()
    stored = (kafka / "cluster.id").read_text().strip()
    assert stored and not stored.startswith("-")
    (kafka / "cluster.id").write_text("AbCdEfGhIjKlMnOpQrStUv\n")
    stack._kafka_programs()
    assert (kafka / "cluster.id").read_text().strip() == "AbCdEfGhIjKlMnOpQrStUv"  # a good id is kept

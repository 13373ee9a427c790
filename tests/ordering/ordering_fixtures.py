"""Helpers shared by the ordering tests: seed data shaped like the pipeline's, tokens, a test client holder."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from ordering.auth import create_token
from ordering.lifecycle import outbox_emitter
from ordering.place import place
from trends.tables import part_health, trend_windows

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def alert(tractor: str, part: str, signal: str, n: int = 1, ttf_h: float = 100.0, level: float = 200.0,
          slope: float = -0.5, threshold: float = 150.0, episode: str | None = None) -> dict[str, Any]:
    """A wear alert shaped like the trend handler's."""
    ep = episode or f"{tractor}:{part}:1"
    detected = T0 + timedelta(hours=99)
    return {"alert_id": f"{ep}#{n}", "episode_id": ep, "tractor_id": tractor, "part_id": part, "signal": signal,
            "level": level, "slope_per_h": slope, "slope_ci_per_h": [slope * 1.2, slope * 0.8], "ttf_h": ttf_h,
            "ttf_earliest_h": ttf_h * 0.8, "failure_threshold": threshold, "lead_time_h": 120.0,
            "detected_at": detected.isoformat(), "window_ids": [f"{tractor}:{signal}:{detected.isoformat()}"]}


def seed_fleet(sessions: sessionmaker[Session], tractors: int = 6) -> None:
    """Trend windows for T00001's oil pressure (falling), part health for every tractor, and three orders."""
    with sessions() as session:
        rows = [{"tractor_id": "T00001", "signal": "oil_pressure_kpa", "window_start": T0 + timedelta(hours=h),
                 "window_end": T0 + timedelta(hours=h + 1), "count": 6, "mean": 320.0 - 1.2 * h + (h % 5) * 0.8,
                 "min": 310.0 - 1.2 * h, "max": 330.0 - 1.2 * h, "std": 2.0, "norm_value": 320.0 - 1.2 * h,
                 "slope_per_h": -1.2, "slope_lo": -1.4, "slope_hi": -1.0, "quality_flags": ""} for h in range(100)]
        session.execute(insert(trend_windows), rows)
        health = []
        for i in range(1, tractors + 1):
            tid = f"T{i:05d}"
            worn = i == 1
            health.append({"tractor_id": tid, "part_id": "OIL-PUMP", "signal": "oil_pressure_kpa",
                           "level": 200.0 if worn else 318.0, "health": 0.3 if worn else 0.97 + i / 1000,
                           "slope_per_h": -1.2 if worn else 0.0, "ttf_h": 41.0 if worn else None, "ttf_lo_h": None,
                           "status": "alert" if worn else "ok", "as_of": T0 + timedelta(hours=100)})
            health.append({"tractor_id": tid, "part_id": "BEARING", "signal": "vibration_mm_s", "level": 3.0,
                           "health": 0.8 if i == 2 else 0.95, "slope_per_h": 0.0, "ttf_h": None, "ttf_lo_h": None,
                           "status": "warning" if i == 2 else "ok", "as_of": T0 + timedelta(hours=100)})
        session.execute(insert(part_health), health)
        emit = outbox_emitter(session, "ordering-place")
        place(session, alert("T00001", "OIL-PUMP", "oil_pressure_kpa", ttf_h=41.0, slope=-1.2), emit,
              now=T0 + timedelta(hours=100))
        place(session, alert("T00002", "BEARING", "vibration_mm_s", ttf_h=300.0, level=8.0, slope=0.01,
                             threshold=11.2), emit, now=T0 + timedelta(hours=101))
        place(session, alert("T00003", "DPF", "dpf_soot_pct", ttf_h=900.0, level=70.0, slope=0.02,
                             threshold=100.0), emit, now=T0 + timedelta(hours=102))
        session.commit()


@dataclass
class Api:
    """A test client over a seeded database, with one token per role."""

    client: TestClient
    sessions: sessionmaker[Session]
    url: str
    tokens: dict[str, str]

    def h(self, role: str) -> dict[str, str]:
        """Authorization header of the role's token."""
        return {"Authorization": f"Bearer {self.tokens[role]}"}


def make_tokens(sessions: sessionmaker[Session]) -> dict[str, str]:
    """One token per role."""
    tokens = {}
    with sessions() as session:
        for role in ("operator", "analyst", "admin"):
            tokens[role] = create_token(session, role, f"test {role}")[1]
        session.commit()
    return tokens


def free_port_for_tests() -> int:
    """A TCP port nobody listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

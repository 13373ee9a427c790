"""The worker replaces a Kafka consumer that stays outside its group (kafka-python can stall after a rebalance)."""

from __future__ import annotations

import threading
from enum import Enum
from types import SimpleNamespace
from typing import Any

import pytest

from functions import worker as worker_mod
from functions.worker import AsyncCommitter, KafkaWorker


class State(Enum):
    STABLE = 1
    REBALANCING = 2


class FakeConsumer:
    """Just enough of KafkaConsumer for the membership check."""

    def __init__(self, state: State, rejoin_needed: bool = False, coordinator_id: int | None = 1) -> None:
        self._coordinator = SimpleNamespace(state=state, rejoin_needed=rejoin_needed, coordinator_id=coordinator_id)
        self.closed = False
        self.subscribed: list[str] = []

    def close(self, autocommit: bool = False) -> None:
        self.closed = True

    def subscribe(self, topics: list[str], listener: Any = None) -> None:
        self.subscribed = topics


def _worker(state: State, monkeypatch: pytest.MonkeyPatch, **stuck: Any) -> tuple[KafkaWorker, list[FakeConsumer]]:
    made: list[FakeConsumer] = []

    def new_consumer(self: KafkaWorker) -> FakeConsumer:
        made.append(FakeConsumer(State.STABLE))
        return made[-1]

    monkeypatch.setattr(KafkaWorker, "_new_consumer", new_consumer)
    w = KafkaWorker.__new__(KafkaWorker)
    w.fn = SimpleNamespace(name="fn")
    w.worker_id, w.group, w.topics = "t:1", "g", ["telemetry"]
    w.stop_event, w.generation, w.unpositioned, w.unsettled_since = threading.Event(), 0, set(), None
    w.consumer = FakeConsumer(state, **stuck)
    w.committer = AsyncCommitter(w.consumer)  # type: ignore[arg-type]
    return w, made


def test_a_consumer_stuck_rebalancing_is_replaced_after_the_stall_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    w, made = _worker(State.REBALANCING, monkeypatch)
    clock = [1000.0]
    monkeypatch.setattr(worker_mod.time, "monotonic", lambda: clock[0])
    stuck = w.consumer
    w._check_membership()
    clock[0] += worker_mod.STALL_S - 1
    w._check_membership()
    assert w.consumer is stuck and not made  # a normal rebalance takes seconds: leave it alone
    clock[0] += 2
    w._check_membership()
    assert stuck.closed and w.consumer is made[0] and w.committer.consumer is made[0]
    assert made[0].subscribed == ["telemetry"] and w.generation == 1


def test_an_idle_but_stable_member_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    w, made = _worker(State.STABLE, monkeypatch)
    clock = [0.0]
    monkeypatch.setattr(worker_mod.time, "monotonic", lambda: clock[0])
    for _ in range(5):
        w._check_membership()
        clock[0] += worker_mod.STALL_S
    assert not made and not w.consumer.closed


@pytest.mark.parametrize("stuck", [{"rejoin_needed": True}, {"coordinator_id": None}])
def test_a_stable_looking_consumer_that_never_rejoins_is_replaced(stuck: dict[str, Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    w, made = _worker(State.STABLE, monkeypatch, **stuck)
    clock = [0.0]
    monkeypatch.setattr(worker_mod.time, "monotonic", lambda: clock[0])
    old = w.consumer
    w._check_membership()
    clock[0] += worker_mod.STALL_S + 1
    w._check_membership()
    assert old.closed and w.consumer is made[0]

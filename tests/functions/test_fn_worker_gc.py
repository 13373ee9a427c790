"""A function worker process makes full garbage collections rare and freezes what startup allocated."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from fleetwatch.settings import Settings
from functions.worker import tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.mark.usefixtures("restore_gc")
def test_a_worker_runs_full_collections_rarely_by_default() -> None:
    young, middle, _ = gc.get_threshold()
    tune_gc(Settings().functions_gc_full_every)
    assert gc.get_threshold() == (young, middle, 1000)
    assert gc.get_freeze_count() > 0  # the imported modules no longer take part in collections


@pytest.mark.usefixtures("restore_gc")
def test_zero_keeps_the_interpreters_own_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETWATCH_FUNCTIONS_GC_FULL_EVERY", "0")
    before = gc.get_threshold()
    tune_gc(Settings().functions_gc_full_every)
    assert gc.get_threshold() == before

"""A pool of worker processes for one function: N consumer-group members, restarted if they die, autoscaled on lag."""

from __future__ import annotations

import logging
import math
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("fleetwatch.functions")


@dataclass
class ScalePolicy:
    """Autoscaling between ``minimum`` and ``maximum`` workers from total offset lag."""

    minimum: int
    maximum: int
    lag_per_worker: int
    interval_s: float
    calm_checks: int = 3  # consecutive checks wanting fewer workers before one is removed

    def desired(self, lag: int, current: int, partitions: int) -> int:
        """Workers wanted for ``lag`` (never more than partitions: extra members would idle)."""
        ceiling = max(self.minimum, min(self.maximum, partitions or self.maximum))
        wanted = math.ceil(lag / self.lag_per_worker) if lag > 0 else self.minimum
        return max(self.minimum, min(ceiling, wanted))


class WorkerPool:
    """Keeps worker processes running; ``command(i)`` is the argv of member ``i``."""

    def __init__(self, command: Callable[[int], list[str]], workers: int,
                 policy: ScalePolicy | None = None, lag: Callable[[], tuple[int, int]] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.command = command
        self.target = workers
        self.policy = policy
        self.lag = lag  # () -> (total lag, partitions)
        self.env = env
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.stop_event = threading.Event()
        self._calm = 0
        self._restarts: dict[int, float] = {}

    @property
    def running(self) -> int:
        """Worker processes alive right now."""
        return sum(1 for p in self.procs.values() if p.poll() is None)

    def _start(self, i: int) -> None:
        self.procs[i] = subprocess.Popen(self.command(i), env=self.env)
        log.info("worker %d started (pid %d)", i, self.procs[i].pid)

    def _stop(self, i: int, grace_s: float = 30.0) -> None:
        proc = self.procs.pop(i)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.info("worker %d stopped", i)

    def reconcile(self) -> None:
        """Restart dead members (at most once per 5 s each) and match the target count."""
        for i, proc in list(self.procs.items()):
            if proc.poll() is not None and i < self.target:
                if time.monotonic() - self._restarts.get(i, 0.0) >= 5.0:
                    log.warning("worker %d exited with %s; restarting", i, proc.returncode)
                    self._restarts[i] = time.monotonic()
                    self._start(i)
        for i in range(self.target):
            if i not in self.procs:
                self._start(i)
        for i in sorted(self.procs, reverse=True):
            if i >= self.target:
                self._stop(i)

    def autoscale(self) -> None:
        """Move the target one step toward what the lag asks for (up at once, down after calm checks)."""
        if self.policy is None or self.lag is None:
            return
        try:
            lag, partitions = self.lag()
        except Exception as exc:  # noqa: BLE001 - a failed lag probe must not stop the workers
            log.warning("lag probe failed: %s", exc)
            return
        wanted = self.policy.desired(lag, self.target, partitions)
        if wanted > self.target:
            log.info("lag %d: scaling up %d -> %d", lag, self.target, wanted)
            self.target, self._calm = wanted, 0
        elif wanted < self.target:
            self._calm += 1
            if self._calm >= self.policy.calm_checks:
                log.info("lag %d: scaling down %d -> %d", lag, self.target, self.target - 1)
                self.target, self._calm = self.target - 1, 0
        else:
            self._calm = 0

    def run(self) -> None:
        """Supervise until ``stop_event`` is set, then stop every member."""
        next_scale = time.monotonic() + (self.policy.interval_s if self.policy else 0)
        try:
            while not self.stop_event.is_set():
                self.reconcile()
                if self.policy and time.monotonic() >= next_scale:
                    self.autoscale()
                    next_scale = time.monotonic() + self.policy.interval_s
                self.stop_event.wait(0.5)
        finally:
            for i in sorted(self.procs):
                if self.procs[i].poll() is None:
                    self.procs[i].send_signal(signal.SIGTERM)
            for i in sorted(self.procs):
                self._stop(i)

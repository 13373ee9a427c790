"""Event-source-mapping semantics: batch, invoke, retry, bisect, on-failure, checkpoint."""

from __future__ import annotations

import importlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from functions import store
from functions.config import FunctionConfig
from functions.model import Context, Handler, Metrics, Record, build_event

log = logging.getLogger("fleetwatch.functions")


class InvocationTimeout(Exception):
    """The handler ran past the function's timeout."""


class Checkpointer(Protocol):
    """Makes a batch's effects and its consumed offsets durable together."""

    def commit(self, session: Session | None, offsets: dict[tuple[str, int], int]) -> None:
        """Persist offsets (inside ``session``'s transaction when there is one)."""


class FailureSink(Protocol):
    """Receives records the function gave up on, with the reason."""

    def __call__(self, records: Sequence[Record], reason: str, detail: str) -> None:
        """Deliver the records to the on-failure destination."""


def load_handler(path: str) -> Handler:
    """Import ``module.path:function``."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def failure_document(fn: FunctionConfig, r: Record, reason: str, detail: str) -> dict[str, Any]:
    """On-failure destination record: what failed, why, and the original payload."""
    import base64

    return {
        "function": fn.name,
        "reason": reason,
        "detail": detail[:2000],
        "topic": r.topic,
        "partition": r.partition,
        "offset": r.offset,
        "timestamp": r.timestamp,
        "key_b64": base64.b64encode(r.key).decode() if r.key is not None else None,
        "value_b64": base64.b64encode(r.value).decode(),
        "headers": [[k, base64.b64encode(v).decode()] for k, v in r.headers],
        "failed_at": datetime.now(UTC).isoformat(),
    }


@contextmanager
def _time_limit(seconds: float):  # noqa: ANN202 - generator context manager
    """Raise InvocationTimeout in the main thread after ``seconds`` (no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(*_: object) -> None:
        raise InvocationTimeout(f"invocation exceeded {seconds:g}s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _next_offsets(records: Sequence[Record]) -> dict[tuple[str, int], int]:
    offsets: dict[tuple[str, int], int] = {}
    for r in records:
        key = (r.topic, r.partition)
        offsets[key] = max(offsets.get(key, 0), r.offset + 1)
    return offsets


@dataclass
class Stats:
    """Per-function counters, reported by ``fleetwatch functions stats``."""

    invocations: int = 0
    errors: int = 0
    records_in: int = 0
    failed_records: int = 0
    filtered_records: int = 0
    expired_records: int = 0


class Invoker:
    """Runs one function over batches with Lambda's retry/bisect/on-failure rules; no Kafka inside."""

    def __init__(self, fn: FunctionConfig, handler: Handler, checkpointer: Checkpointer,
                 on_failure: FailureSink, sessions: sessionmaker[Session] | None = None,
                 topic: Callable[[str], str] = lambda t: t, publish: Callable[[], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.fn = fn
        self.handler = handler
        self.checkpointer = checkpointer
        self.on_failure = on_failure
        self.sessions = sessions
        self.topic = topic
        self.publish = publish or (lambda: None)
        self.sleep = sleep
        self.metrics = Metrics()
        self.stats = Stats()
        self.durations_ms: list[float] = []

    # -------------------------------------------------------------- public
    def process(self, records: Sequence[Record]) -> None:
        """Handle one polled batch to completion: every record ends committed or on-failure."""
        if not records:
            return
        self.stats.records_in += len(records)
        self._run(list(records))
        self.publish()

    # -------------------------------------------------------------- internals
    def _invoke(self, records: Sequence[Record]) -> tuple[set[tuple[str, int, int]] | None, str | None]:
        """Invoke once; commit on success. Returns (failed item ids or None, error text or None)."""
        session = self.sessions() if self.sessions else None
        ctx = Context(self.fn.name, self.fn.timeout_s, session, self.fn.params, self.metrics, self.topic)
        started = time.monotonic()
        outcome, detail, failed_items = "ok", None, None
        try:
            with _time_limit(self.fn.timeout_s):
                response = self.handler(build_event(records), ctx)
            failed_items = self._item_failures(response, records)
            offsets = _next_offsets(records)
            if failed_items:
                offsets = self._checkpoint_before(records, failed_items)
                outcome = "partial"
            if session is not None:
                for e in ctx.emitted:
                    store.enqueue(session, self.fn.name, e.topic, e.key, e.value)
                self._log_invocation(session, ctx, started, len(records), outcome, None)
            elif ctx.emitted:
                raise RuntimeError("emitting needs a transactional function (the outbox lives in the database)")
            self.checkpointer.commit(session, offsets)
        except Exception as exc:  # noqa: BLE001 - a handler may raise anything; it's an error outcome
            if isinstance(exc, OperationalError):  # database unreachable or locked: not the records' fault
                if session is not None:
                    session.rollback()
                raise
            outcome, detail = ("timeout" if isinstance(exc, InvocationTimeout) else "error"), repr(exc)[:2000]
            if session is not None:
                session.rollback()
            self.stats.errors += 1
            ctx.logger.warning("invocation %s failed: %s", ctx.request_id, detail)
            self._log_failure(ctx, started, len(records), outcome, detail)
            return None, detail
        finally:
            if session is not None:
                session.close()
            self.stats.invocations += 1
            self.durations_ms.append((time.monotonic() - started) * 1000)
            if len(self.durations_ms) > 10_000:
                del self.durations_ms[:5_000]
        return failed_items, None

    def _run(self, records: list[Record]) -> None:
        attempts = 0
        while records:
            failed_items, error = self._invoke(records)
            if error is None and not failed_items:
                return
            if error is None and failed_items:
                # Partial failure: committed up to the lowest failed record per partition; retry from there.
                resume = self._checkpoint_before(records, failed_items)
                records = [r for r in records if r.offset >= resume.get((r.topic, r.partition), r.offset + 1)]
                error = "batch item failures reported"
            attempts += 1
            retries = self.fn.maximum_retry_attempts
            if retries < 0 or attempts <= retries:
                self.sleep(min(0.05 * 2 ** (attempts - 1), 5.0))
                continue
            if self.fn.bisect_batch_on_error and len(records) > 1:
                half = len(records) // 2
                self._run(records[:half])
                self._run(records[half:])
                return
            self._give_up(records, "retries_exhausted", error or "")
            return

    def _give_up(self, records: Sequence[Record], reason: str, detail: str) -> None:
        """Send records to the on-failure destination, then move the checkpoint past them."""
        self.on_failure(records, reason, detail)
        self.stats.failed_records += len(records)
        session = self.sessions() if self.sessions else None
        try:
            self.checkpointer.commit(session, _next_offsets(records))
        finally:
            if session is not None:
                session.close()

    def _item_failures(self, response: Any, records: Sequence[Record]) -> set[tuple[str, int, int]]:
        if not self.fn.report_item_failures or not isinstance(response, dict):
            return set()
        items = response.get("batchItemFailures") or []
        by_offset = {(str(r.partition), str(r.offset)): r for r in records}
        failed: set[tuple[str, int, int]] = set()
        for item in items:
            ident = str(item.get("itemIdentifier", "")) if isinstance(item, dict) else ""
            # itemIdentifier is "partition:offset" or "topic-partition:offset"
            part, _, offset = ident.rpartition(":")
            part = part.rsplit("-", 1)[-1]
            r = by_offset.get((part, offset))
            if r is None:
                raise ValueError(f"batchItemFailures names an unknown record {ident!r}")
            failed.add((r.topic, r.partition, r.offset))
        return failed

    @staticmethod
    def _checkpoint_before(records: Sequence[Record], failed: set[tuple[str, int, int]]) -> dict[tuple[str, int], int]:
        """Next offset per partition: the lowest failed record where one failed, else past the batch."""
        offsets = _next_offsets(records)
        for t, p, o in failed:
            offsets[(t, p)] = min(offsets[(t, p)], o)
        return offsets

    def _log_invocation(self, session: Session, ctx: Context, started: float, size: int, outcome: str,
                        detail: str | None) -> None:
        session.execute(insert(store.fn_invocations).values(
            function=self.fn.name, request_id=ctx.request_id, started_at=datetime.now(UTC),
            duration_ms=(time.monotonic() - started) * 1000, batch_size=size, outcome=outcome, detail=detail))

    def _log_failure(self, ctx: Context, started: float, size: int, outcome: str, detail: str) -> None:
        if not self.sessions:
            return
        with self.sessions() as session:
            self._log_invocation(session, ctx, started, size, outcome, detail)
            session.commit()


def json_failure_sink(send: Callable[[str, bytes | None, bytes], None], fn: FunctionConfig,
                      topic: Callable[[str], str]) -> FailureSink:
    """A FailureSink that writes one JSON document per record to the function's failure topic."""

    def sink(records: Sequence[Record], reason: str, detail: str) -> None:
        for r in records:
            doc = failure_document(fn, r, reason, detail)
            send(topic(fn.failure_topic), r.key, json.dumps(doc).encode())

    return sink

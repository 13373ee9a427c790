"""Event-source-mapping semantics: filter, age out, batch, invoke, retry, bisect, on-failure, windows, checkpoint.

The Invoker knows nothing about Kafka: it gets polled batches (sorted by topic, partition, offset) and a
Checkpointer that makes offsets durable, so every rule here is unit-testable with an in-memory source.
"""

from __future__ import annotations

import base64
import importlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any, Protocol

from sqlalchemy import insert
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from functions import store
from functions.config import FunctionConfig
from functions.model import Context, Handler, Metrics, Record, build_event, filter_document, partition_runs
from functions.store import Fenced

log = logging.getLogger("fleetwatch.functions")
TP = tuple[str, int]
Window = tuple[int, Any]  # (window start in ms, state)
BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 5.0
_OFFSET = attrgetter("offset")
_TIMESTAMP = attrgetter("timestamp")

__all__ = ["Checkpointer", "CommitFailed", "Fenced", "InvocationTimeout", "Invoker", "MemoryCheckpointer", "Stopped",
           "failure_document", "load_handler"]


class InvocationTimeout(BaseException):
    """The handler ran past the function's timeout (a BaseException: a handler's ``except Exception`` can't eat it)."""


class Stopped(Exception):
    """The worker was asked to stop while a final window invocation was still being retried."""


class CommitFailed(Fenced):
    """A pipelined batch's background commit failed: what was handled after it is void; rewind to the stored offsets."""


class _Pipeline:
    """The background commit of a pipelined function's batch: one at a time, on its own thread."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.emitted = False  # the batch in flight wrote outbox rows (publish once it has committed)
        self.request_id: str | None = None  # the invocation whose batch is in flight

    @property
    def busy(self) -> bool:
        """A batch was handed over and its outcome has not been collected by ``wait`` yet."""
        return self._thread is not None

    def submit(self, job: Callable[[], None], emitted: bool, request_id: str) -> None:
        """Run ``job`` (writes and commit of one batch) in the background; at most one at a time."""
        assert self._thread is None, "wait() for the batch in flight first"

        def run() -> None:
            try:
                job()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread by wait()
                self._error = exc

        self.emitted, self.request_id = emitted, request_id
        self._thread = threading.Thread(target=run, name="fn-commit", daemon=True)
        self._thread.start()

    def wait(self) -> bool:
        """Wait for the batch in flight; True when it wrote outbox rows. Raises CommitFailed when it failed."""
        thread = self._thread
        if thread is None:
            return False
        thread.join()  # (a timeout interrupting this leaves the batch in flight, to be awaited again)
        self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise CommitFailed(f"background commit failed: {type(error).__name__}: {error}"[:2000]) from error
        return self.emitted


class Checkpointer(Protocol):
    """Makes a batch's effects, its consumed offsets and its window state durable together."""

    def commit(self, session: Session | None, offsets: dict[TP, int], expected: dict[TP, int | None],
               windows: dict[TP, Window | None]) -> None:
        """Persist (inside ``session``'s transaction when there is one); raise Fenced if offsets moved."""


class DbCheckpointer:
    """Stores offsets and window state in the database, in the same transaction as the handler's writes."""

    def __init__(self, group: str) -> None:
        self.group = group

    def commit(self, session: Session | None, offsets: dict[TP, int], expected: dict[TP, int | None],
               windows: dict[TP, Window | None]) -> None:
        """Compare-and-set offsets, store window state, commit the transaction."""
        assert session is not None, "a transactional function needs a database session"
        store.advance_offsets(session, self.group, offsets, expected)
        for (topic, partition), window in windows.items():
            store.save_window_state(session, self.group, topic, partition, window)
        session.commit()


@dataclass
class MemoryCheckpointer:
    """Offsets and window state in memory: for tests and for functions without database effects."""

    offsets: dict[TP, int] = field(default_factory=dict)
    windows: dict[TP, Window] = field(default_factory=dict)
    commits: int = 0

    def commit(self, session: Session | None, offsets: dict[TP, int], expected: dict[TP, int | None],
               windows: dict[TP, Window | None]) -> None:
        """Record offsets and window state (commits the session's transaction when given one)."""
        for tp, before in expected.items():
            if tp in offsets and self.offsets.get(tp) != before:
                raise Fenced(f"{tp} moved away from {before}")
        self.offsets.update(offsets)
        for tp, window in windows.items():
            if window is None:
                self.windows.pop(tp, None)
            else:
                self.windows[tp] = window
        self.commits += 1
        if session is not None:
            session.commit()


def load_handler(path: str) -> Handler:
    """Import ``module.path:function``, with a clear error when it is not there."""
    module, _, attr = path.partition(":")
    try:
        handler = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"handler {path!r} cannot be imported: {exc}") from exc
    if not callable(handler):
        raise ImportError(f"handler {path!r} is not callable")
    return handler


def failure_document(fn: FunctionConfig, r: Record, condition: str, detail: str, group: str = "",
                     attempts: int = 0) -> dict[str, Any]:
    """On-failure destination record: what failed, why, where it came from, and the original payload."""
    return {
        "version": "1.0",
        "function": fn.name,
        "condition": condition,
        "reason": condition,
        "detail": detail[:2000],
        "approximate_invoke_count": attempts,
        "consumer_group": group or fn.group,
        "topic": r.topic,
        "partition": r.partition,
        "offset": r.offset,
        "timestamp": r.timestamp,
        "key_b64": base64.b64encode(r.key).decode() if r.key is not None else None,
        "value_b64": base64.b64encode(r.value).decode(),
        "value_json": r.json(),
        "headers": [[k, base64.b64encode(v).decode()] for k, v in r.headers],
        "failed_at": datetime.now(UTC).isoformat(),
    }


#: PEP 249's exception names for "the database went away" (any driver: psycopg, sqlite3, …).
_DRIVER_CONNECTION_ERRORS = ("OperationalError", "InterfaceError")


def database_unreachable(exc: BaseException) -> bool:
    """True when an error says the database connection failed, not that the records were bad.

    SQLAlchemy wraps a driver's errors, but a handler that talks to the driver directly (PostgreSQL ``COPY``)
    gets the driver's own classes; a killed server then raises the driver's ``OperationalError``. Such a batch
    must be retried from the stored offsets once the database is back, never sent to the on-failure destination.
    """
    if isinstance(exc, DBAPIError):
        return isinstance(exc, OperationalError) or exc.connection_invalidated
    return any(c.__name__ in _DRIVER_CONNECTION_ERRORS and c.__module__ != "builtins" for c in type(exc).__mro__)


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise InvocationTimeout in the main thread after ``seconds`` (elsewhere the caller checks afterwards)."""
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


@dataclass
class Stats:
    """Per-worker counters (the database keeps the per-function totals)."""

    invocations: int = 0
    errors: int = 0
    timeouts: int = 0
    records_in: int = 0
    failed_records: int = 0
    filtered_records: int = 0
    expired_records: int = 0
    windows_closed: int = 0
    background_commits: int = 0  # batches a pipelined function handed to the background commit


@dataclass(slots=True)
class _Pending:
    """One partition of the batch in hand: its offsets in order, how many are done in a row, and later ones done."""

    offsets: list[int]
    cursor: int = 0
    done: set[int] = field(default_factory=set)


@dataclass
class _Outcome:
    ok: bool
    failed: set[tuple[str, int, int]] = field(default_factory=set)
    error: str | None = None


class Invoker:
    """Runs one function over batches with Lambda's event-source-mapping rules; no Kafka inside."""

    def __init__(self, fn: FunctionConfig, handler: Handler, checkpointer: Checkpointer,
                 sessions: sessionmaker[Session] | None = None, *,
                 log_sessions: sessionmaker[Session] | None = None,
                 send: Callable[[str, bytes | None, bytes], None] | None = None,
                 topic: Callable[[str], str] = lambda t: t, publish: Callable[[], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.time,
                 group: str | None = None, worker: str | None = None,
                 should_stop: Callable[[], bool] = lambda: False) -> None:
        self.fn = fn
        self.handler = handler
        self.checkpointer = checkpointer
        self.sessions = sessions  # effects (and offsets) in the handler's transaction when set
        self.log_sessions = log_sessions or sessions  # where invocation logs go (None: only the logger)
        self.send = send
        self.topic = topic
        self.publish = publish or (lambda: None)
        self.unpublished = True  # outbox rows may be waiting (at start: maybe left by an earlier worker)
        self.sleep = sleep
        self.clock = clock
        self.group = group or fn.group
        self.worker = worker or f"{os.uname().nodename}:{os.getpid()}"
        self.should_stop = should_stop
        self.filter = fn.record_filter
        self.metrics = Metrics()
        self.stats = Stats()
        self.durations_ms: list[float] = []
        self.failures: list[dict[str, Any]] = []  # on-failure documents sent by this worker (last 1000)
        # Stored next offset per owned partition (None: nothing stored yet), and the open window per partition.
        self.positions: dict[TP, int | None] = {}
        self.windows: dict[TP, Window] = {}
        self._closed: dict[TP, int] = {}  # start of the last window closed per partition
        self._parts: dict[TP, _Pending] = {}  # per partition of the batch in hand: what is done, what is not
        self._unlogged_filtered = 0
        self._log_buffer: list[dict[str, Any]] = []
        self._log_flushed = time.monotonic()
        # Pipelined functions: the batch whose writes and commit run in the background (FunctionConfig.pipelined).
        self._pipeline = _Pipeline() if fn.pipelined and fn.transactional and sessions is not None \
            and fn.tumbling_window_s == 0 else None
        self._sync_next = False  # after a failed background commit, the batch is handled again synchronously

    # -------------------------------------------------------------- ownership
    def assign(self, positions: dict[TP, int | None], windows: dict[TP, Window] | None = None) -> None:
        """Take ownership of partitions whose stored offsets (and open windows) are given."""
        self.positions.update(positions)
        for tp in positions:
            self.windows.pop(tp, None)
        self.windows.update(windows or {})

    def revoke(self, partitions: Sequence[TP]) -> None:
        """Forget partitions another member now owns."""
        for tp in partitions:
            self.positions.pop(tp, None)
            self.windows.pop(tp, None)
            self._closed.pop(tp, None)

    # -------------------------------------------------------------- public
    def process(self, records: Sequence[Record]) -> None:
        """Handle one polled batch to completion: every record ends committed, filtered or on-failure.

        Raises Fenced when another member took a partition (the caller re-seeks) and OperationalError when
        the database is unreachable (the caller rewinds to the stored offsets).
        """
        if not records:
            return
        self.stats.records_in += len(records)
        self._parts = {tp: _Pending(list(map(_OFFSET, run))) for tp, run in partition_runs(records)}
        try:
            accepted = self._apply_filter(records)
            if self.fn.tumbling_window_s > 0:
                self._run_windows(accepted)
            else:
                self._run(accepted)
            self._commit_leftovers()
            if self._sync_next:  # the batch a failed background commit left was handled synchronously
                self.drain()
                self._sync_next = False
        finally:
            self.publish_pending()

    def drain(self) -> None:
        """Wait for a pipelined batch still committing in the background, then relay what it put in the outbox.

        Raises CommitFailed when that commit failed (the caller rewinds to the stored offsets).
        """
        if self._pipeline is None or not self._pipeline.busy:
            return
        try:
            if self._pipeline.wait():
                self.unpublished = True
        except CommitFailed:
            self._sync_next = True
            raise
        self.publish_pending()

    def publish_pending(self) -> None:
        """Relay the outbox when this worker committed rows to it (or an earlier relay did not finish)."""
        if self.unpublished:
            self.publish()
            self.unpublished = False

    def tick(self, idle: set[TP] | None = None) -> None:
        """Close tumbling windows whose end has passed on partitions that are caught up (``idle``; None: all).

        A partition still delivering records closes its window when a record of a later window arrives, so a
        backlog is never cut into several invocations of one window.
        """
        if self.fn.tumbling_window_s <= 0:
            return
        now_ms = int(self.clock() * 1000)
        width = self.fn.tumbling_window_s * 1000
        try:
            for tp, (start, _) in sorted(self.windows.items()):
                if start + width <= now_ms and (idle is None or tp in idle):
                    self._finalize(tp)
        finally:
            self.publish_pending()

    # -------------------------------------------------------------- batch shaping
    def _apply_filter(self, records: Sequence[Record]) -> list[Record]:
        if not self.filter:
            return list(records)
        accepted: list[Record] = []
        for r in records:
            if self.filter.matches(filter_document(r)):
                accepted.append(r)
            else:
                self._parts[(r.topic, r.partition)].done.add(r.offset)
        dropped = len(records) - len(accepted)
        self.stats.filtered_records += dropped
        self._unlogged_filtered += dropped
        return accepted

    def _drop_expired(self, records: list[Record]) -> list[Record]:
        """Send records older than the maximum record age to the on-failure destination; keep the rest."""
        if self.fn.maximum_record_age_s < 0 or not records:
            return records
        oldest_ok = int(self.clock() * 1000) - self.fn.maximum_record_age_s * 1000
        expired = [r for r in records if r.timestamp < oldest_ok]
        if not expired:
            return records
        self.stats.expired_records += len(expired)
        self._give_up(expired, "RecordAgeExceeded", f"older than {self.fn.maximum_record_age_s}s", 0)
        return [r for r in records if r.timestamp >= oldest_ok]

    # -------------------------------------------------------------- retry / bisect
    def _run(self, records: list[Record], window: TP | None = None) -> None:
        attempts = 0
        while records:
            records = self._drop_expired(records)
            if not records:
                return
            outcome = self._invoke(records, window)
            attempts += 1
            if outcome.ok and not outcome.failed:
                return
            error = outcome.error or ""
            if outcome.failed:
                # Checkpoint at the lowest failed offset per partition; only the rest is retried.
                resume = self._lowest_failed(records, outcome.failed)
                prefix = [r for r in records if r.offset < resume.get((r.topic, r.partition), r.offset + 1)]
                records = [r for r in records if r.offset >= resume.get((r.topic, r.partition), r.offset + 1)]
                if prefix and self.sessions is not None:
                    # The handler's transaction was rolled back: run the good prefix alone so its effects land once.
                    self._run(prefix, window)
                error = "batchItemFailures: " + ", ".join(f"{t}-{p}:{o}" for t, p, o in sorted(outcome.failed))
            retries = self.fn.maximum_retry_attempts
            if retries < 0 or attempts <= retries:
                self.sleep(min(BACKOFF_BASE_S * 2 ** (attempts - 1), BACKOFF_MAX_S))
                continue
            if self.fn.bisect_batch_on_error and len(records) > 1:
                half = len(records) // 2
                self._run(records[:half], window)
                self._run(records[half:], window)
                return
            self._give_up(records, "RetryAttemptsExhausted", error, attempts)
            return

    @staticmethod
    def _lowest_failed(records: Sequence[Record], failed: set[tuple[str, int, int]]) -> dict[TP, int]:
        resume: dict[TP, int] = {}
        for r in records:
            resume[(r.topic, r.partition)] = r.offset + 1
        for t, p, o in failed:
            resume[(t, p)] = min(resume[(t, p)], o)
        return resume

    # -------------------------------------------------------------- one invocation
    def _invoke(self, records: Sequence[Record], window: TP | None = None, final: bool = False) -> _Outcome:
        """Invoke once; on success commit effects, offsets and window state together."""
        session = self.sessions() if self.sessions else None
        ctx = Context(self.fn.name, self.fn.timeout_s, session, self.fn.params, self.metrics, self.topic)
        pipeline = self._pipeline if window is None and not self._sync_next and session is not None \
            and session.get_bind().dialect.name == "postgresql" else None
        if pipeline is not None:
            ctx.pipelined = True
            ctx.pending_commit = pipeline.request_id if pipeline.busy else None
            ctx.wait_for_commit = self.drain
        extra = self._window_fields(window, final) if window else None
        started_at, started = datetime.now(UTC), time.monotonic()
        ctx.logger.addHandler(ctx.captured)
        log.debug("START RequestId: %s Function: %s Records: %d", ctx.request_id, self.fn.name, len(records))
        outcome, detail, failed = "ok", None, set()
        try:
            try:
                with _time_limit(self.fn.timeout_s):
                    response = self.handler(build_event(records, extra=extra, runs=partition_runs(records)), ctx)
                if time.monotonic() - started > self.fn.timeout_s:
                    raise InvocationTimeout(f"invocation exceeded {self.fn.timeout_s:g}s")
                if session is not None:
                    session.flush()  # ORM writes fail here, as the handler's error, not at commit
                failed = self._item_failures(response, records)
                new_state = self._new_state(response) if window else None
            except (Exception, InvocationTimeout) as exc:  # noqa: BLE001 - any handler error is an error outcome
                if isinstance(exc, CommitFailed):  # the previous batch's background commit (wait_for_commit)
                    if session is not None:
                        session.rollback()
                    raise
                if database_unreachable(exc):  # not the records' fault: the worker rewinds to the stored offsets
                    if isinstance(exc, OperationalError):
                        raise
                    raise OperationalError(None, None, exc) from exc  # type: ignore[arg-type]
                outcome = "timeout" if isinstance(exc, InvocationTimeout) else "error"
                detail = f"{type(exc).__name__}: {exc}"[:2000]
                if session is not None:
                    if isinstance(exc, InvocationTimeout):
                        session.invalidate()  # the connection may have been interrupted mid-protocol
                    else:
                        session.rollback()
                self.stats.errors += 1
                self.stats.timeouts += outcome == "timeout"
                log.warning("%s: invocation %s failed: %s", self.fn.name, ctx.request_id, detail)
                self._log_separately(ctx, started_at, started, len(records), outcome, detail, records)
                return _Outcome(ok=False, error=detail)
            if failed:
                outcome, detail = "partial", ", ".join(f"{t}-{p}:{o}" for t, p, o in sorted(failed))
                if session is not None:
                    session.rollback()
                    self._log_separately(ctx, started_at, started, len(records), outcome, detail, records)
                else:  # no transaction to undo: checkpoint before the lowest failed record, as Lambda does
                    resume = self._lowest_failed(records, failed)
                    done = [r for r in records if r.offset < resume[(r.topic, r.partition)]]
                    self._commit(None, done, {})
                    self._log_separately(ctx, started_at, started, len(records), outcome, detail, records)
                return _Outcome(ok=True, failed=failed)
            if ctx.emitted and session is None:
                raise RuntimeError("emitting needs a transactional function (the outbox lives in the database)")
            windows: dict[TP, Window | None] = {}
            if window is not None:
                windows[window] = None if final else (self.windows[window][0], new_state)
            if pipeline is not None and session is not None:
                self._hand_over(pipeline, session, ctx, records, started_at, started)
                session = None  # the background commit closes it
                return _Outcome(ok=True)
            if session is not None:
                for e in ctx.emitted:
                    store.enqueue(session, self.fn.name, e.topic, e.key, e.value)
                self._log_row(session, ctx, started_at, started, len(records), outcome, None, records)
            self._commit(session, records, windows)
            if session is None:
                self._log_separately(ctx, started_at, started, len(records), outcome, None, records)
            elif ctx.emitted:
                self.unpublished = True
            return _Outcome(ok=True)
        finally:
            ctx.logger.removeHandler(ctx.captured)
            if session is not None:
                session.close()
            self.stats.invocations += 1
            elapsed = (time.monotonic() - started) * 1000
            self.durations_ms.append(elapsed)
            if len(self.durations_ms) > 10_000:
                del self.durations_ms[:5_000]
            log.debug("END RequestId: %s", ctx.request_id)
            log.debug("REPORT RequestId: %s Duration: %.2f ms Records: %d Outcome: %s", ctx.request_id, elapsed,
                      len(records), outcome)

    def _hand_over(self, pipeline: _Pipeline, session: Session, ctx: Context, records: Sequence[Record],
                   started_at: datetime, started: float) -> None:
        """Checkpoint a handled batch in the background: its deferred writes, outbox, log row, offsets, commit.

        The previous batch's commit is awaited first (one in flight at a time); the positions move on at once, so
        the next batch is read and handled meanwhile. The next batch's offsets compare-and-set expects these
        offsets, so if this commit fails the next one cannot commit either: the worker rewinds (CommitFailed).
        """
        try:
            self.drain()
        except CommitFailed:
            session.rollback()
            session.close()
            raise
        offsets, cursors, extra = self._frontier(records)
        expected = {tp: self.positions.get(tp) for tp in offsets}
        deferred, emitted = list(ctx.deferred), list(ctx.emitted)
        log_row = self._log_values(ctx, started_at, started, len(records), "ok", None, records)
        name, checkpointer = self.fn.name, self.checkpointer

        def commit() -> None:
            try:
                for write in deferred:
                    write(session)
                for e in emitted:
                    store.enqueue(session, name, e.topic, e.key, e.value)
                session.execute(insert(store.fn_invocations).values(log_row))
                checkpointer.commit(session, offsets, expected, {})
            except BaseException:
                session.rollback()
                raise
            finally:
                session.close()

        pipeline.submit(commit, bool(emitted), ctx.request_id)
        self.stats.background_commits += 1
        self._advance(offsets, cursors, extra)

    def _commit(self, session: Session | None, records: Sequence[Record], windows: dict[TP, Window | None]) -> None:
        """Checkpoint ``records`` as done (plus window state), atomically with the session's writes."""
        self.drain()  # a pipelined batch still committing goes first
        offsets, cursors, extra = self._frontier(records)
        expected = {tp: self.positions.get(tp) for tp in offsets}
        if not offsets and not windows and session is None:
            return
        try:
            self.checkpointer.commit(session, offsets, expected, windows)
        except Fenced:
            if session is not None:
                session.rollback()
            raise
        self._advance(offsets, cursors, extra)
        for tp, window in windows.items():
            if window is None:
                self.windows.pop(tp, None)
            else:
                self.windows[tp] = window

    def _advance(self, offsets: dict[TP, int], cursors: dict[TP, int], extra: dict[TP, set[int]]) -> None:
        """Move the batch in hand and the positions past a checkpoint (``_frontier``'s result)."""
        for tp, done in extra.items():
            self._parts[tp].done.update(done)
        for tp, cursor in cursors.items():
            self._parts[tp].cursor = cursor
        self.positions.update(offsets)

    def _frontier(self, records: Sequence[Record]) -> tuple[dict[TP, int], dict[TP, int], dict[TP, set[int]]]:
        """Next offsets once ``records`` are done: each partition moves past its contiguous done prefix.

        Also returns the new cursors and the offsets to remember as done out of order. The usual case, records
        that are exactly the next ones of their partition, costs nothing per record.
        """
        extra: dict[TP, set[int]] = {}
        cursors: dict[TP, int] = {}
        for tp, run in partition_runs(records):
            part = self._parts.get(tp)
            if part is None:
                continue
            todo, c, k = part.offsets, part.cursor, len(run)
            if c + k <= len(todo) and todo[c] == run[0].offset and todo[c + k - 1] == run[-1].offset:
                cursors[tp] = c + k  # a sorted subset with these ends and this length is todo[c:c + k]
            else:
                extra[tp] = set(map(_OFFSET, run))
        offsets: dict[TP, int] = {}
        for tp, part in self._parts.items():
            todo, start = part.offsets, part.cursor
            c, new = cursors.get(tp, start), extra.get(tp, ())
            while c < len(todo) and (todo[c] in part.done or todo[c] in new):
                c += 1
            if c > start:
                cursors[tp] = c
                offsets[tp] = todo[c - 1] + 1
        return offsets, cursors, extra

    def _commit_leftovers(self) -> None:
        """Commit offsets of records that needed no invocation (filtered out at the end of a batch)."""
        if not self._frontier([])[0] and not self._unlogged_filtered:
            return
        session = self.sessions() if self.sessions else None
        try:
            if session is not None and self._unlogged_filtered:
                self._log_event(session, "filtered", 0, filtered=self._unlogged_filtered)
            self._commit(session, [], {})
            if session is None and self._unlogged_filtered:
                self._log_event_separately("filtered", 0, filtered=self._unlogged_filtered)
            self._unlogged_filtered = 0
        finally:
            if session is not None:
                session.close()

    # -------------------------------------------------------------- on-failure
    def _give_up(self, records: Sequence[Record], condition: str, detail: str, attempts: int) -> None:
        """Send records to the on-failure destination, then checkpoint past them (one transaction with the DB)."""
        docs = [failure_document(self.fn, r, condition, detail, self.group, attempts) for r in records]
        target = self.topic(self.fn.failure_topic)
        session = self.sessions() if self.sessions else None
        try:
            if session is not None:  # through the outbox: the documents leave exactly when the offsets move
                for r, doc in zip(records, docs, strict=True):
                    store.enqueue(session, self.fn.name, target, r.key, doc)
                self._log_event(session, condition, len(records), failed=len(records), detail=detail)
            else:
                if self.send is None:
                    raise RuntimeError(f"{self.fn.name}: no on-failure sender configured")
                for r, doc in zip(records, docs, strict=True):
                    self.send(target, r.key, json.dumps(doc).encode())
            self._commit(session, records, {})
            if session is None:
                self._log_event_separately(condition, len(records), failed=len(records), detail=detail)
            else:
                self.unpublished = True
        finally:
            if session is not None:
                session.close()
        self.stats.failed_records += len(records)
        self.failures.extend(docs)
        del self.failures[:-1000]
        log.warning("%s: %d record(s) sent to %s (%s): %s", self.fn.name, len(records), target, condition,
                    detail[:200])

    # -------------------------------------------------------------- tumbling windows
    def _run_windows(self, records: list[Record]) -> None:
        width = self.fn.tumbling_window_s * 1000
        by_tp: dict[TP, list[Record]] = {}
        for r in records:
            by_tp.setdefault((r.topic, r.partition), []).append(r)
        for tp, recs in by_tp.items():
            group: list[Record] = []
            for r in recs:
                # A record stamped inside a window that was already closed counts toward the next one.
                start = max(r.timestamp - r.timestamp % width, self._closed.get(tp, -width) + width)
                current = self.windows.get(tp)
                if current is not None and start > current[0]:
                    # A record of a later window: finish what we have, then close the current window.
                    self._run(group, tp)
                    group = []
                    self._finalize(tp)
                    current = None
                if current is None:
                    self.windows[tp] = (start, {})
                group.append(r)
            self._run(group, tp)

    def _finalize(self, tp: TP) -> None:
        """Invoke with ``isFinalInvokeForWindow`` until it succeeds, then drop the window's state."""
        attempts = 0
        while True:
            start = self.windows[tp][0]
            outcome = self._invoke([], tp, final=True)
            if outcome.ok:
                self.stats.windows_closed += 1
                self._closed[tp] = start
                return
            attempts += 1
            if self.should_stop():
                raise Stopped(f"{self.fn.name}: stopped while retrying the final invocation of a window on {tp}")
            self.sleep(min(BACKOFF_BASE_S * 2 ** (attempts - 1), BACKOFF_MAX_S))

    def _window_fields(self, tp: TP, final: bool) -> dict[str, Any]:
        start, state = self.windows[tp]
        end = start + self.fn.tumbling_window_s * 1000
        iso = lambda ms: datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")  # noqa: E731
        return {"window": {"start": iso(start), "end": iso(end)}, "state": state, "shardId": f"{tp[0]}-{tp[1]}",
                "isFinalInvokeForWindow": final, "isWindowTerminatedEarly": False}

    def _new_state(self, response: Any) -> Any:
        if isinstance(response, dict) and "state" in response:
            state = response["state"]
            json.dumps(state)  # must be storable; a TypeError makes this invocation an error
            return state if state is not None else {}
        return {}

    # -------------------------------------------------------------- batch item failures
    def _item_failures(self, response: Any, records: Sequence[Record]) -> set[tuple[str, int, int]]:
        if not self.fn.report_item_failures or not isinstance(response, dict):
            return set()
        items = response.get("batchItemFailures") or []
        if not isinstance(items, list):
            raise ValueError("batchItemFailures must be a list")
        by_offset = {(str(r.partition), str(r.offset)): r for r in records}
        failed: set[tuple[str, int, int]] = set()
        for item in items:
            ident = str(item.get("itemIdentifier", "")) if isinstance(item, dict) else ""
            # itemIdentifier is "partition:offset" or "topic-partition:offset" (Lambda's Kafka form)
            part, _, offset = ident.rpartition(":")
            part = part.rsplit("-", 1)[-1]
            r = by_offset.get((part, offset))
            if r is None:
                raise ValueError(f"batchItemFailures names an unknown record {ident!r}")
            failed.add((r.topic, r.partition, r.offset))
        return failed

    # -------------------------------------------------------------- invocation logs
    def _log_values(self, ctx: Context, started_at: datetime, started: float, size: int, outcome: str,
                    detail: str | None, records: Sequence[Record]) -> dict[str, Any]:
        newest = max(map(_TIMESTAMP, records)) if records else None
        filtered, self._unlogged_filtered = self._unlogged_filtered, 0
        return dict(
            function=self.fn.name, request_id=ctx.request_id, started_at=started_at,
            duration_ms=(time.monotonic() - started) * 1000, batch_size=size, outcome=outcome, detail=detail,
            worker=self.worker, records_failed=0, records_filtered=filtered,
            iterator_age_ms=int(self.clock() * 1000) - newest if newest is not None else None,
            log="\n".join(ctx.captured.lines) or None)

    def _log_row(self, session: Session, ctx: Context, started_at: datetime, started: float, size: int,
                 outcome: str, detail: str | None, records: Sequence[Record]) -> None:
        session.execute(insert(store.fn_invocations).values(
            self._log_values(ctx, started_at, started, size, outcome, detail, records)))

    def _log_separately(self, ctx: Context, started_at: datetime, started: float, size: int, outcome: str,
                        detail: str | None, records: Sequence[Record]) -> None:
        self._buffer_log(self._log_values(ctx, started_at, started, size, outcome, detail, records))

    def _event_values(self, outcome: str, size: int, failed: int = 0, filtered: int = 0,
                      detail: str | None = None) -> dict[str, Any]:
        return dict(function=self.fn.name, request_id="-", started_at=datetime.now(UTC), duration_ms=0.0,
                    batch_size=size, outcome=outcome, detail=detail[:2000] if detail else None, worker=self.worker,
                    records_failed=failed, records_filtered=filtered, iterator_age_ms=None, log=None)

    def _log_event(self, session: Session, outcome: str, size: int, failed: int = 0, filtered: int = 0,
                   detail: str | None = None) -> None:
        """A log row for runtime actions that are not invocations (on-failure, filtered-only commits)."""
        session.execute(insert(store.fn_invocations).values(self._event_values(outcome, size, failed, filtered,
                                                                               detail)))

    def _log_event_separately(self, outcome: str, size: int, failed: int = 0, filtered: int = 0,
                              detail: str | None = None) -> None:
        self._buffer_log(self._event_values(outcome, size, failed, filtered, detail))

    def _buffer_log(self, row: dict[str, Any]) -> None:
        """Log rows outside a handler transaction are written in bulk (at most ~1 s late)."""
        if not self.log_sessions:
            return
        self._log_buffer.append(row)
        if len(self._log_buffer) >= 200 or time.monotonic() - self._log_flushed > 1.0:
            self.flush_logs()

    def flush_logs(self) -> None:
        """Write buffered invocation log rows (call when idle and before exiting)."""
        if not self._log_buffer or not self.log_sessions:
            self._log_flushed = time.monotonic()
            return
        rows, self._log_buffer = self._log_buffer, []
        with self.log_sessions() as session:
            session.execute(insert(store.fn_invocations), rows)
            session.commit()
        self._log_flushed = time.monotonic()

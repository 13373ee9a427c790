"""Sample handlers: a no-op for benchmarks and small handlers that show (and test) the mapping's semantics.

Each takes its knobs from ``context.params`` (the ``[function.params]`` table of its declaration).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Any

from sqlalchemy import text

from functions.model import Context, event_records

# Per-process attempt counts of records asked to fail a few times (``"fail_times": n`` in the value).
ATTEMPTS: Counter[tuple[str, int, int]] = Counter()
# Offsets of every invocation of ``store_rows`` in this process when ``params.trace`` is set.
TRACE: list[list[int]] = []


def noop(event: dict[str, Any], context: Context) -> None:
    """Do nothing (measures the runtime's own cost)."""


def noop_from(event: dict[str, Any], context: Context) -> None:
    """Do nothing, but not before ``params.start_at`` (epoch s): lets every member of a pool join first (benchmarks)."""
    time.sleep(max(0.0, float(context.params.get("start_at", 0)) - time.time()))


def store_rows(event: dict[str, Any], context: Context) -> dict[str, Any] | None:
    """Insert one row per record into ``params.table`` (topic, partition, offset, worker) in the batch's transaction.

    A record whose value has ``"poison": true`` makes the whole invocation fail; ``"fail_times": n`` makes it
    fail its first n attempts (reported as a batch item failure); ``"sleep_s": x`` sleeps x seconds.
    ``params.sleep_s`` sleeps half-way through the inserts of every batch (to kill a worker mid-batch).
    """
    session = context.session
    assert session is not None, "store_rows needs a transactional function"
    table = context.params["table"]
    records = event_records(event)
    if context.params.get("trace"):
        TRACE.append([r["offset"] for r in records])
    failures: list[dict[str, str]] = []
    pause = float(context.params.get("sleep_s", 0))
    for i, r in enumerate(records):
        value = r["json"] if isinstance(r["json"], dict) else {}
        if value.get("poison"):
            raise ValueError(f"poison record at {r['topic']}-{r['partition']}:{r['offset']}")
        if value.get("sleep_s"):
            time.sleep(float(value["sleep_s"]))
        ident = (r["topic"], r["partition"], r["offset"])
        if ATTEMPTS[ident] < int(value.get("fail_times", 0)):
            ATTEMPTS[ident] += 1
            failures.append({"itemIdentifier": f"{r['topic']}-{r['partition']}:{r['offset']}"})
            continue
        if pause and i == len(records) // 2:
            time.sleep(pause)
        session.execute(text(f'INSERT INTO "{table}" (topic, part, "offset", worker) VALUES (:t, :p, :o, :w)'),
                        {"t": r["topic"], "p": r["partition"], "o": r["offset"], "w": str(os.getpid())})
    context.metrics.incr("rows", len(records) - len(failures))
    return {"batchItemFailures": failures} if failures else None


# Threads that ran ``store_rows_deferred``'s writes, and the offsets whose first write was made to fail.
WRITERS: list[str] = []
COMMIT_FAILED: Counter[int] = Counter()


def store_rows_deferred(event: dict[str, Any], context: Context) -> None:
    """``store_rows`` with the inserts deferred (``context.defer``): a pipelined function writes them in the background.

    ``params.fail_commit_at`` (an offset) makes the first write of the batch holding it fail, as a background
    commit can (the batch is then handled again); ``params.sleep_s`` pauses every write that long.
    """
    rows = [{"t": r["topic"], "p": r["partition"], "o": r["offset"], "w": str(os.getpid())}
            for r in event_records(event)]
    table = context.params["table"]
    fail_at = context.params.get("fail_commit_at")
    pause = float(context.params.get("sleep_s", 0))

    def write(session: Any) -> None:
        WRITERS.append(threading.current_thread().name)
        if pause:
            time.sleep(pause)
        if fail_at is not None and any(r["o"] == fail_at for r in rows) and not COMMIT_FAILED[fail_at]:
            COMMIT_FAILED[fail_at] += 1
            raise RuntimeError(f"write of offset {fail_at} failed (test)")
        session.execute(text(f'INSERT INTO "{table}" (topic, part, "offset", worker) VALUES (:t, :p, :o, :w)'), rows)

    context.defer(write)
    context.metrics.incr("rows", len(rows))


FINAL_FAILURES: Counter[str] = Counter()


def window_sum(event: dict[str, Any], context: Context) -> dict[str, Any]:
    """Tumbling-window aggregate: count and sum of ``value.n`` per window, written to ``params.table`` at the end.

    With ``params.fail_final`` the first final invocation of each window fails (it is retried until it succeeds).
    """
    state = dict(event.get("state") or {})
    for r in event_records(event):
        n = r["json"].get("n", 0) if isinstance(r["json"], dict) else 0
        state["count"] = state.get("count", 0) + 1
        state["sum"] = state.get("sum", 0) + n
    if event.get("isFinalInvokeForWindow"):
        window = event["window"]["start"]
        if context.params.get("fail_final") and FINAL_FAILURES[window] == 0:
            FINAL_FAILURES[window] += 1
            raise RuntimeError(f"final invocation of window {window} fails once")
        assert context.session is not None, "window_sum writes its result to the database"
        context.session.execute(
            text(f'INSERT INTO "{context.params["table"]}" (shard, window_start, n, total) VALUES (:s, :w, :c, :t)'),
            {"s": event["shardId"], "w": window, "c": state.get("count", 0), "t": state.get("sum", 0)})
        return {"state": {}}
    return {"state": state}

"""Running functions with no broker: an in-memory record source and one-off invocations of sample events.

``MemorySource`` + ``run_local`` drive the very same Invoker as the Kafka worker, so every mapping rule
(filters, retries, bisect, on-failure, batch item failures, windows, timeouts) can be tested in-process::

    source = MemorySource.of("telemetry", [{"n": 1}, {"n": 2}], partitions=2)
    result = run_local(fn, handler, source)
    assert result.failures == []
"""

from __future__ import annotations

import base64
import json
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from functions.config import FunctionConfig
from functions.model import Context, Handler, Metrics, Record, build_event
from functions.runtime import TP, DbCheckpointer, Invoker, MemoryCheckpointer


@dataclass
class MemorySource:
    """Records per partition, read in order like a Kafka topic."""

    records: dict[TP, list[Record]] = field(default_factory=dict)

    @classmethod
    def of(cls, topic: str, values: Iterable[Any], partitions: int = 1, timestamp_ms: int | None = None,
           key: Callable[[int, Any], str | None] | None = None) -> MemorySource:
        """Spread JSON ``values`` round-robin over ``partitions`` (or by ``key`` hash) of ``topic``."""
        source = cls()
        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        for i, value in enumerate(values):
            k = key(i, value) if key else None
            p = (zlib.crc32(k.encode()) % partitions) if k is not None else i % partitions
            source.append(topic, p, json.dumps(value).encode(), k.encode() if k else None, now)
        return source

    def append(self, topic: str, partition: int, value: bytes, key: bytes | None = None,
               timestamp_ms: int | None = None) -> Record:
        """Add one record at the end of a partition."""
        recs = self.records.setdefault((topic, partition), [])
        ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        r = Record(topic, partition, len(recs), ts, key, value)
        recs.append(r)
        return r

    def poll(self, positions: dict[TP, int], max_records: int) -> list[Record]:
        """Next records from the given positions, at most ``max_records``, across partitions."""
        batch: list[Record] = []
        for tp in sorted(self.records):
            start = positions.get(tp, 0)
            batch.extend(self.records[tp][start:start + max_records - len(batch)])
            if len(batch) >= max_records:
                break
        return batch


@dataclass
class LocalResult:
    """What a local run did: committed offsets, on-failure documents and the Invoker (for its stats)."""

    offsets: dict[TP, int]
    failures: list[dict[str, Any]]
    invoker: Invoker


def run_local(fn: FunctionConfig, handler: Handler, source: MemorySource,
              sessions: sessionmaker[Session] | None = None, clock: Callable[[], float] = time.time,
              max_batches: int = 100_000, checkpointer: MemoryCheckpointer | DbCheckpointer | None = None,
              positions: dict[TP, int] | None = None) -> LocalResult:
    """Consume ``source`` to its end through the runtime, then close windows whose end has passed.

    With ``sessions`` the function is transactional (offsets, state and outbox in that database);
    otherwise offsets and window state are kept in memory and on-failure documents are collected.
    """
    sent: list[dict[str, Any]] = []
    cp = checkpointer or (DbCheckpointer(fn.group) if sessions else MemoryCheckpointer())
    invoker = Invoker(fn, handler, cp, sessions, send=lambda t, k, v: sent.append(json.loads(v)),
                      sleep=lambda s: None, clock=clock)
    invoker.assign(dict.fromkeys(source.records, None) | dict(positions or {}))
    for _ in range(max_batches):
        here = {tp: p if p is not None else 0 for tp, p in invoker.positions.items()}
        batch = source.poll(here, fn.batch_size)
        if not batch:
            break
        invoker.process(batch)
    invoker.drain()
    invoker.tick()
    invoker.flush_logs()
    done = {tp: p for tp, p in invoker.positions.items() if p is not None}
    return LocalResult(done, invoker.failures, invoker)


def records_from_event(event: dict[str, Any] | list[Any], topic: str = "local") -> list[Record]:
    """Records of a sample event: a Lambda Kafka event (``records`` by topic-partition) or a list of values."""
    if isinstance(event, list):
        return [Record(topic, 0, i, int(time.time() * 1000), None, json.dumps(v).encode())
                for i, v in enumerate(event)]
    if not isinstance(event, dict) or not isinstance(event.get("records"), dict):
        raise ValueError('an event is a JSON object with "records": {"topic-partition": [...]} or a JSON list')
    out: list[Record] = []
    for tp_name, recs in event["records"].items():
        if not isinstance(recs, list):
            raise ValueError(f"records[{tp_name!r}] must be a list")
        default_topic, _, default_part = str(tp_name).rpartition("-")
        for i, r in enumerate(recs):
            if not isinstance(r, dict):
                raise ValueError(f"records[{tp_name!r}][{i}] must be an object")
            if "value" in r and isinstance(r["value"], str):
                value = base64.b64decode(r["value"])
            elif "json" in r:
                value = json.dumps(r["json"]).encode()
            else:
                raise ValueError(f"records[{tp_name!r}][{i}] needs a base64 \"value\" or a \"json\" value")
            key = base64.b64decode(r["key"]) if isinstance(r.get("key"), str) else None
            out.append(Record(r.get("topic", default_topic or topic), int(r.get("partition", default_part or 0)),
                              int(r.get("offset", i)), int(r.get("timestamp", time.time() * 1000)), key, value))
    return out


def invoke_once(fn: FunctionConfig, handler: Handler, records: list[Record], session: Session | None,
                extra: dict[str, Any] | None = None) -> tuple[Any, Context]:
    """Call the handler once on ``records`` the way the runtime does (no retries, no checkpoint)."""
    ctx = Context(fn.name, fn.timeout_s, session, fn.params, Metrics())
    response = handler(build_event(records, extra=extra), ctx)
    return response, ctx

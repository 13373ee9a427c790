"""The programming model: records, the Lambda-style Kafka event, and the invocation context."""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

Handler = Callable[[dict[str, Any], "Context"], Any]


@dataclass(frozen=True)
class Record:
    """One Kafka record as the runtime sees it."""

    topic: str
    partition: int
    offset: int
    timestamp: int  # ms since epoch (Kafka CreateTime)
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()

    def json(self) -> Any:
        """The value decoded as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.value)
        except ValueError:
            return None


def event_record(r: Record) -> dict[str, Any]:
    """A record in the shape of AWS Lambda's Kafka event, plus the decoded JSON value."""
    return {
        "topic": r.topic,
        "partition": r.partition,
        "offset": r.offset,
        "timestamp": r.timestamp,
        "timestampType": "CREATE_TIME",
        "key": base64.b64encode(r.key).decode() if r.key is not None else None,
        "value": base64.b64encode(r.value).decode(),
        "headers": [{k: list(v)} for k, v in r.headers],
        "json": r.json(),
    }


def filter_document(r: Record) -> dict[str, Any]:
    """What filter criteria are matched against: metadata plus the decoded value (as Lambda does for Kafka)."""
    value = r.json()
    if value is None and r.value not in (b"null", b" null"):
        value = r.value.decode("utf-8", "replace")
    return {
        "topic": r.topic, "partition": r.partition, "offset": r.offset, "timestamp": r.timestamp,
        "key": r.key.decode("utf-8", "replace") if r.key is not None else None,
        "headers": {k: v.decode("utf-8", "replace") for k, v in r.headers},
        "value": value,
    }


def build_event(records: Sequence[Record], source: str = "fleetwatch:kafka",
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Group records by ``topic-partition`` the way Lambda's Kafka event does."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        grouped.setdefault(f"{r.topic}-{r.partition}", []).append(event_record(r))
    event: dict[str, Any] = {"eventSource": source, "records": grouped}
    if extra:
        event.update(extra)
    return event


def event_records(event: dict[str, Any]) -> list[dict[str, Any]]:
    """All records of an event in partition order, for handlers that don't care about grouping."""
    return [r for recs in event.get("records", {}).values() for r in recs]


@dataclass
class Metrics:
    """Counters a handler may bump through ``context.metrics``."""

    counters: Counter[str] = field(default_factory=Counter)

    def incr(self, name: str, value: float = 1) -> None:
        """Add ``value`` to counter ``name``."""
        self.counters[name] += value


@dataclass
class Emitted:
    """A message a handler asked to publish once its batch commits."""

    topic: str
    key: bytes | None
    value: dict[str, Any] | bytes


class _Capture(logging.Handler):
    """Keeps the first lines a handler logs during one invocation, for the invocation log."""

    def __init__(self, limit: int = 50) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.limit = limit
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.lines) < self.limit:
            self.lines.append(self.format(record)[:1000])


class Context:
    """What a handler gets besides the event: identity, time left, logger, metrics, DB session, emit."""

    def __init__(self, function_name: str, timeout_s: float, session: Session | None,
                 params: dict[str, Any], metrics: Metrics, topic: Callable[[str], str] = lambda t: t) -> None:
        self.function_name = function_name
        self.aws_request_id = self.request_id = uuid.uuid4().hex
        self._deadline = time.monotonic() + timeout_s
        self.logger = logging.getLogger(f"fleetwatch.fn.{function_name}")
        if self.logger.level == logging.NOTSET:
            self.logger.setLevel(logging.INFO)  # like Lambda: INFO lines of a handler reach its log
        self.captured = _Capture()
        self.metrics = metrics
        self.session = session
        self.params = params
        self.emitted: list[Emitted] = []
        self._topic = topic

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds until the invocation times out."""
        return max(0, int((self._deadline - time.monotonic()) * 1000))

    def emit(self, topic: str, key: str | bytes | None, value: dict[str, Any] | bytes) -> None:
        """Publish ``value`` to the logical ``topic`` after this batch commits (exactly once with the DB)."""
        k = key.encode() if isinstance(key, str) else key
        self.emitted.append(Emitted(self._topic(topic), k, value))

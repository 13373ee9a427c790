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


_UNDECODED: Any = object()


@dataclass(slots=True)
class Record:
    """One Kafka record as the runtime sees it (treat as read-only)."""

    topic: str
    partition: int
    offset: int
    timestamp: int  # ms since epoch (Kafka CreateTime)
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    _decoded: Any = field(default=_UNDECODED, repr=False, compare=False)

    def json(self) -> Any:
        """The value decoded as JSON, or None when it is not JSON (decoded once, then cached)."""
        if self._decoded is _UNDECODED:
            try:
                self._decoded = json.loads(self.value)
            except ValueError:
                self._decoded = None
        return self._decoded


_LAZY_FIELDS = ("key", "value", "headers", "json")
_dict_init = dict.__init__


class EventRecord(dict):  # type: ignore[type-arg]
    """A record in the shape of AWS Lambda's Kafka event, plus ``json``: the value decoded as JSON.

    A plain dict to the handler; the base64 fields and the decoded value are computed on first access, so a
    handler that never reads them does not pay for them (iteration, ``items()`` and ``json.dumps`` see all).
    """

    __slots__ = ("_record",)

    def __init__(self, r: Record) -> None:
        _dict_init(self, topic=r.topic, partition=r.partition, offset=r.offset, timestamp=r.timestamp,
                   timestampType="CREATE_TIME")
        self._record = r

    def _fill(self, name: str) -> Any:
        r = self._record
        if name == "key":
            value: Any = base64.b64encode(r.key).decode() if r.key is not None else None
        elif name == "value":
            value = base64.b64encode(r.value).decode()
        elif name == "headers":
            value = [{k: list(v)} for k, v in r.headers]
        else:
            value = r.json()
        dict.__setitem__(self, name, value)
        return value

    def _complete(self) -> None:
        for name in _LAZY_FIELDS:
            if not dict.__contains__(self, name):
                self._fill(name)

    def __missing__(self, name: str) -> Any:
        if name in _LAZY_FIELDS:
            return self._fill(name)
        raise KeyError(name)

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        """Like dict.get, computing lazy fields."""
        if dict.__contains__(self, name):
            return dict.__getitem__(self, name)
        return self._fill(name) if name in _LAZY_FIELDS else default

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or name in _LAZY_FIELDS

    def __iter__(self):  # type: ignore[no-untyped-def]  # noqa: ANN204
        self._complete()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self._complete()
        return dict.__len__(self)

    def __eq__(self, other: object) -> bool:
        self._complete()
        return dict.__eq__(self, other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        self._complete()
        return dict.__repr__(self)

    def keys(self):  # type: ignore[no-untyped-def]  # noqa: ANN201
        """All keys, lazy ones included."""
        self._complete()
        return dict.keys(self)

    def items(self):  # type: ignore[no-untyped-def]  # noqa: ANN201
        """All items, lazy ones computed."""
        self._complete()
        return dict.items(self)

    def values(self):  # type: ignore[no-untyped-def]  # noqa: ANN201
        """All values, lazy ones computed."""
        self._complete()
        return dict.values(self)

    def copy(self) -> dict[str, Any]:
        """A plain dict with every field."""
        self._complete()
        return dict(dict.items(self))


def event_record(r: Record) -> dict[str, Any]:
    """A record in the shape of AWS Lambda's Kafka event, plus the decoded JSON value."""
    return EventRecord(r)


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
    last: tuple[str, int] | None = None
    bucket: list[dict[str, Any]] = []
    for r in records:  # usually sorted by partition: one lookup per run of a partition
        if (r.topic, r.partition) != last:
            last = (r.topic, r.partition)
            bucket = grouped.setdefault(f"{r.topic}-{r.partition}", [])
        bucket.append(EventRecord(r))
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

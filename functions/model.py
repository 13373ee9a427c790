"""The programming model: records, the Lambda-style Kafka event, and the invocation context."""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from bisect import bisect_right
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter
from typing import Any

import orjson
from sqlalchemy.orm import Session

Handler = Callable[[dict[str, Any], "Context"], Any]


_UNDECODED: Any = object()


# A run of 19 digits, found as "0" * 19 once every digit reads "0" (a C-speed pass; a regex search cost 3× the parse).
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19


def loads_json(value: bytes | str) -> Any:
    """``json.loads(value)``, several times faster for plain UTF-8 JSON.

    orjson parses what it can; what it refuses (NaN, UTF-16, a BOM, lone surrogates, …) goes to the stdlib parser, and
    so does any text with a run of 19+ digits, which orjson would read as a float where the stdlib keeps an integer.
    """
    raw = value.encode() if isinstance(value, str) else value
    if _LONG_RUN not in raw.translate(_DIGITS_TO_ZERO):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(value)


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
                self._decoded = loads_json(self.value)
            except ValueError:
                self._decoded = None
        return self._decoded


_TP_KEY = attrgetter("topic", "partition")
_FIELDS = ("topic", "partition", "offset", "timestamp", "timestampType", "key", "value", "headers", "json")
_new_dict = dict.__new__


def partition_runs(records: Sequence[Record]) -> list[tuple[tuple[str, int], Sequence[Record]]]:
    """Split records sorted by (topic, partition) into one slice per partition (binary search, not a scan)."""
    if not records:
        return []
    first, last = records[0], records[-1]
    if first.partition == last.partition and first.topic == last.topic:
        return [((first.topic, first.partition), records)]
    runs: list[tuple[tuple[str, int], Sequence[Record]]] = []
    i, n = 0, len(records)
    while i < n:
        r = records[i]
        tp = (r.topic, r.partition)
        j = bisect_right(records, tp, i, n, key=_TP_KEY)
        runs.append((tp, records[i:j]))
        i = j
    return runs


class EventRecord(dict):  # type: ignore[type-arg]
    """A record in the shape of AWS Lambda's Kafka event, plus ``json``: the value decoded as JSON.

    A plain dict to the handler; every field is computed on first access (the base64 ones and the decoded
    value included), so building an event costs one small object per record and a handler pays only for
    what it reads (iteration, ``items()``, ``==`` and ``json.dumps`` see all fields).
    """

    __slots__ = ("_record",)

    def __init__(self, r: Record) -> None:
        dict.__init__(self, topic=r.topic, partition=r.partition)
        self._record = r

    def _fill(self, name: str) -> Any:
        r = self._record
        if name == "key":
            value: Any = base64.b64encode(r.key).decode() if r.key is not None else None
        elif name == "value":
            value = base64.b64encode(r.value).decode()
        elif name == "headers":
            value = [{k: list(v)} for k, v in r.headers]
        elif name == "json":
            value = r.json()
        elif name == "timestampType":
            value = "CREATE_TIME"
        else:
            value = getattr(r, name)
        dict.__setitem__(self, name, value)
        return value

    def _complete(self) -> None:
        if dict.__len__(self) < len(_FIELDS):
            for name in _FIELDS:
                if not dict.__contains__(self, name):
                    self._fill(name)

    def __missing__(self, name: str) -> Any:
        if name in _FIELDS:
            return self._fill(name)
        raise KeyError(name)

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        """Like dict.get, computing lazy fields."""
        if dict.__contains__(self, name):
            return dict.__getitem__(self, name)
        return self._fill(name) if name in _FIELDS else default

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or name in _FIELDS

    def __iter__(self):  # type: ignore[no-untyped-def]  # noqa: ANN204
        self._complete()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self._complete()
        return dict.__len__(self)

    def __eq__(self, other: object) -> bool:
        self._complete()
        if isinstance(other, EventRecord):
            other._complete()
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


_set_record = EventRecord._record.__set__  # type: ignore[attr-defined]
_dict_set = dict.__setitem__


def event_record(r: Record) -> dict[str, Any]:
    """A record in the shape of AWS Lambda's Kafka event, plus the decoded JSON value."""
    return EventRecord(r)


def _event_records(run: Sequence[Record]) -> list[dict[str, Any]]:
    """EventRecords for a run of one partition's records, created without a Python call per record."""
    n = len(run)
    made = list(map(_new_dict, repeat(EventRecord, n)))
    deque(map(_set_record, made, run), maxlen=0)
    if n:  # topic and partition up front: C code that sees an empty dict (json.dumps) would not ask for fields
        deque(map(_dict_set, made, repeat("topic", n), repeat(run[0].topic, n)), maxlen=0)
        deque(map(_dict_set, made, repeat("partition", n), repeat(run[0].partition, n)), maxlen=0)
    return made


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


def build_event(records: Sequence[Record], source: str = "fleetwatch:kafka", extra: dict[str, Any] | None = None,
                runs: Sequence[tuple[tuple[str, int], Sequence[Record]]] | None = None) -> dict[str, Any]:
    """Group records by ``topic-partition`` the way Lambda's Kafka event does.

    ``runs`` (from ``partition_runs``, for records sorted by partition) saves the per-record grouping.
    """
    grouped: dict[str, list[dict[str, Any]]] = {}
    if runs is not None:
        for (topic, partition), run in runs:
            grouped[f"{topic}-{partition}"] = _event_records(run)
    else:
        by_tp: dict[tuple[str, int], list[Record]] = {}
        for r in records:
            by_tp.setdefault((r.topic, r.partition), []).append(r)
        for (topic, partition), recs in by_tp.items():
            grouped[f"{topic}-{partition}"] = _event_records(recs)
    event: dict[str, Any] = {"eventSource": source, "records": grouped}
    if extra:
        event.update(extra)
    return event


def json_values(records: Sequence[dict[str, Any]]) -> list[Any]:
    """Each event record's decoded JSON value (None when not JSON), without the lazy-field lookups per record.

    For handlers that read every record's value: the runtime's records decode straight from their Kafka record;
    any other dict gives its ``json`` entry.
    """
    out: list[Any] = []
    add = out.append
    for r in records:
        if type(r) is EventRecord:
            got = dict.get(r, "json", _UNDECODED)
            add(r._record.json() if got is _UNDECODED else got)
        else:
            add(r.get("json"))
    return out


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
        # Set by the runtime for a pipelined function (FunctionConfig.pipelined): ``defer`` then collects the
        # writes it runs after the handler, and ``pending_commit`` is the request id of this worker's previous
        # batch while it may still be committing (``wait_for_commit`` waits for it; it raises if that failed).
        self.pipelined = False
        self.deferred: list[Callable[[Session], None]] = []
        self.pending_commit: str | None = None
        self.wait_for_commit: Callable[[], None] = lambda: None

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds until the invocation times out."""
        return max(0, int((self._deadline - time.monotonic()) * 1000))

    def defer(self, write: Callable[[Session], None]) -> None:
        """Run ``write(session)`` in this batch's transaction: now, or after the handler when pipelined.

        A pipelined function's deferred writes run on a background thread while the next batch is handled, so
        they must use only what they were given (the session, values computed by the handler).
        """
        if self.pipelined:
            self.deferred.append(write)
        else:
            assert self.session is not None, "deferred writes need a transactional function"
            write(self.session)

    def emit(self, topic: str, key: str | bytes | None, value: dict[str, Any] | bytes) -> None:
        """Publish ``value`` to the logical ``topic`` after this batch commits (exactly once with the DB)."""
        k = key.encode() if isinstance(key, str) else key
        self.emitted.append(Emitted(self._topic(topic), k, value))

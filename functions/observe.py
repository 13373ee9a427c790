"""Observability: invocation logs (START/END/REPORT), per-function metrics, offset lag and a Prometheus endpoint."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from functions import store

log = logging.getLogger("fleetwatch.functions")
INVOKE_OUTCOMES = ("ok", "partial", "error", "timeout")
ERROR_OUTCOMES = ("error", "timeout")
inv = store.fn_invocations


def log_lines(row: Any) -> list[str]:
    """An invocation row as Lambda-style START / (handler output) / END / REPORT lines."""
    at = row.started_at.isoformat(timespec="milliseconds") if row.started_at else "?"
    who = f" Worker: {row.worker}" if getattr(row, "worker", None) else ""
    if row.request_id == "-":  # not an invocation: on-failure delivery or filtered-only commit
        extra = f" Records: {row.batch_size}" if row.batch_size else ""
        filtered = f" Filtered: {row.records_filtered}" if getattr(row, "records_filtered", None) else ""
        detail = f" Detail: {row.detail}" if row.detail else ""
        return [f"{at} {row.outcome.upper()}{extra}{filtered}{detail}{who}"]
    lines = [f"{at} START RequestId: {row.request_id} Records: {row.batch_size}{who}"]
    lines += [f"{at} {line}" for line in (getattr(row, "log", None) or "").splitlines()]
    lines.append(f"{at} END RequestId: {row.request_id}")
    age = f" IteratorAge: {row.iterator_age_ms} ms" if getattr(row, "iterator_age_ms", None) is not None else ""
    detail = f" Error: {row.detail}" if row.detail else ""
    lines.append(f"{at} REPORT RequestId: {row.request_id} Duration: {row.duration_ms:.2f} ms "
                 f"Records: {row.batch_size} Outcome: {row.outcome}{age}{detail}")
    return lines


def recent_logs(session: Session, function: str, after_id: int = 0, limit: int = 50) -> list[Any]:
    """Invocation rows of ``function`` newer than ``after_id`` (the last ``limit`` when after_id is 0)."""
    q = select(inv).where(inv.c.function == function)
    if after_id:
        return list(session.execute(q.where(inv.c.id > after_id).order_by(inv.c.id).limit(limit)))
    return list(reversed(list(session.execute(q.order_by(inv.c.id.desc()).limit(limit)))))


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def function_stats(session: Session, function: str, window_s: float = 3600.0) -> dict[str, Any]:
    """Totals since the start and latency/iterator age over the last ``window_s`` seconds for one function."""
    base = select(inv.c.outcome, func.count(), func.coalesce(func.sum(inv.c.batch_size), 0),
                  func.coalesce(func.sum(inv.c.records_failed), 0),
                  func.coalesce(func.sum(inv.c.records_filtered), 0)).where(inv.c.function == function)
    by_outcome = {row[0]: row[1:] for row in session.execute(base.group_by(inv.c.outcome))}
    invocations = sum(int(v[0]) for k, v in by_outcome.items() if k in INVOKE_OUTCOMES)
    since = datetime.now(UTC) - timedelta(seconds=window_s)
    recent = list(session.execute(
        select(inv.c.duration_ms, inv.c.iterator_age_ms, inv.c.started_at).where(
            inv.c.function == function, inv.c.outcome.in_(INVOKE_OUTCOMES), inv.c.started_at >= since)
        .order_by(inv.c.id.desc()).limit(10_000)))
    durations = [float(r.duration_ms) for r in recent]
    last = recent[0] if recent else None
    return {
        "function": function,
        "invocations": invocations,
        "errors": sum(int(v[0]) for k, v in by_outcome.items() if k in ERROR_OUTCOMES),
        "timeouts": int(by_outcome.get("timeout", (0,))[0]),
        "partial_failures": int(by_outcome.get("partial", (0,))[0]),
        "records_processed": int(by_outcome.get("ok", (0, 0))[1]),
        "records_on_failure": sum(int(v[2]) for v in by_outcome.values()),
        "records_filtered": sum(int(v[3]) for v in by_outcome.values()),
        "duration_p50_ms": _percentile(durations, 0.50),
        "duration_p99_ms": _percentile(durations, 0.99),
        "iterator_age_ms": int(last.iterator_age_ms) if last is not None and last.iterator_age_ms is not None else None,
        "last_invocation": last.started_at.isoformat() if last is not None and last.started_at else None,
    }


def end_offsets(bootstrap: str, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    """Next offset to be written per partition of each topic (missing topics are skipped)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=15_000)
    try:
        tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        return {(tp.topic, tp.partition): o for tp, o in consumer.end_offsets(tps).items()} if tps else {}
    finally:
        consumer.close()


def offset_lag(bootstrap: str, session: Session, group: str, topics: Iterable[str],
               kafka_committed: bool = False) -> dict[tuple[str, int], int]:
    """Records not yet processed per partition: end offset minus the durable offset (DB, or Kafka's group)."""
    topics = list(topics)
    ends = end_offsets(bootstrap, topics)
    if kafka_committed:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        try:
            done = {tp: consumer.committed(TopicPartition(*tp)) or 0 for tp in ends}
        finally:
            consumer.close()
    else:
        done = {}
        for t in topics:
            done.update({(t, p): o for p, o in store.load_offsets(session, group, t).items()})
    return {tp: max(end - done.get(tp, 0), 0) for tp, end in ends.items()}


def prometheus_text(stats: Iterable[dict[str, Any]], lags: dict[str, dict[tuple[str, int], int]],
                    workers: dict[str, int] | None = None) -> str:
    """Prometheus text exposition (format 0.0.4) of per-function metrics."""
    series: list[tuple[str, str, str, list[tuple[dict[str, str], float]]]] = []
    stats = list(stats)

    def metric(name: str, kind: str, help_: str, key: str, scale: float = 1.0) -> None:
        samples = [({"function": s["function"]}, float(s[key]) * scale) for s in stats if s.get(key) is not None]
        series.append((name, kind, help_, samples))

    metric("fleetwatch_function_invocations_total", "counter", "Handler invocations.", "invocations")
    metric("fleetwatch_function_errors_total", "counter", "Invocations that raised or timed out.", "errors")
    metric("fleetwatch_function_timeouts_total", "counter", "Invocations stopped by the timeout.", "timeouts")
    metric("fleetwatch_function_records_on_failure_total", "counter",
           "Records sent to the on-failure destination.", "records_on_failure")
    metric("fleetwatch_function_records_filtered_total", "counter", "Records dropped by filter criteria.",
           "records_filtered")
    metric("fleetwatch_function_duration_seconds_p50", "gauge", "Median invocation duration (last hour).",
           "duration_p50_ms", 0.001)
    metric("fleetwatch_function_duration_seconds_p99", "gauge", "99th percentile invocation duration (last hour).",
           "duration_p99_ms", 0.001)
    metric("fleetwatch_function_iterator_age_seconds", "gauge", "Age of the newest record of the last invocation.",
           "iterator_age_ms", 0.001)
    series.append(("fleetwatch_function_offset_lag", "gauge", "Records not yet processed, per partition.",
                   [({"function": fn, "topic": t, "partition": str(p)}, float(v))
                    for fn, per in lags.items() for (t, p), v in sorted(per.items())]))
    if workers is not None:
        series.append(("fleetwatch_function_workers", "gauge", "Worker processes running.",
                       [({"function": fn}, float(n)) for fn, n in workers.items()]))
    out: list[str] = []
    for name, kind, help_, samples in series:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{rendered}}} {value:g}")
    return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def serve_metrics(port: int, render: Callable[[], str], host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve ``render()`` at ``/metrics`` on ``host:port`` from a daemon thread; returns the server."""

    class _Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics is served here")
                return
            try:
                body = render().encode()
            except Exception as exc:  # noqa: BLE001 - a scrape must get an answer, not a dropped connection
                self.send_error(503, f"metrics unavailable: {exc}")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("metrics: " + format, *args)

    server = ThreadingHTTPServer((host, port), _Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


class Cached:
    """Calls ``fn`` at most once every ``ttl_s`` seconds (scrapes must not hammer Kafka and the database)."""

    def __init__(self, fn: Callable[[], str], ttl_s: float = 2.0) -> None:
        self.fn, self.ttl_s = fn, ttl_s
        self._value: str | None = None
        self._at = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            if self._value is None or time.monotonic() - self._at > self.ttl_s:
                self._value, self._at = self.fn(), time.monotonic()
            return self._value

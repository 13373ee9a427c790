"""Prometheus metrics of one bridge worker, served in the text format on an HTTP port."""

from __future__ import annotations

import logging
import urllib.request
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from ingest.validate import REASONS

log = logging.getLogger("fleetwatch.ingest")


class BridgeMetrics:
    """Received, forwarded, rejected by reason, in flight, Kafka acknowledgement latency."""

    def __init__(self, worker: str = "0") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"worker": worker}
        r = self.registry
        self.received = Counter("fleetwatch_ingest_received", "MQTT messages received", registry=r)
        self.forwarded = Counter("fleetwatch_ingest_forwarded",
                                 "messages with at least one valid sample written to the telemetry topic", registry=r)
        self.samples = Counter("fleetwatch_ingest_forwarded_samples", "valid samples written to telemetry", registry=r)
        self.readings = Counter("fleetwatch_ingest_forwarded_readings", "valid readings written to telemetry",
                                registry=r)
        self.rejected = Counter("fleetwatch_ingest_rejected", "rejections by reason code (one per rejected "
                                "sample, or one per message when the whole message is refused)", ["reason"],
                                registry=r)
        self.dead_lettered = Counter("fleetwatch_ingest_dead_lettered", "documents written to the DLQ topic",
                                     registry=r)
        self.acked = Counter("fleetwatch_ingest_acked", "MQTT messages acknowledged after Kafka acknowledged",
                             registry=r)
        self.kafka_failures = Counter("fleetwatch_ingest_kafka_failures",
                                      "Kafka sends that failed (the bridge reconnects MQTT; nothing is acked)",
                                      registry=r)
        self.in_flight = Gauge("fleetwatch_ingest_in_flight", "MQTT messages received and not yet acknowledged",
                               registry=r)
        self.connected = Gauge("fleetwatch_ingest_mqtt_connected", "1 while subscribed to the broker", registry=r)
        self.ack_latency = Histogram("fleetwatch_ingest_kafka_ack_latency_seconds",
                                     "receive → Kafka acknowledged (acks=all) per MQTT message", registry=r,
                                     buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        info = Gauge("fleetwatch_ingest_worker_info", "which worker this is", ["worker"], registry=r)
        info.labels(**labels).set(1)
        for reason in REASONS:
            self.rejected.labels(reason)  # export zeros, so dashboards see every reason code

    def serve(self, port: int, host: str = "127.0.0.1") -> bool:
        """Start the HTTP endpoint; False (and a warning) when the port is taken, the bridge runs on anyway."""
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            log.warning("metrics port %s:%s unavailable (%s); running without the HTTP endpoint", host, port, exc)
            return False
        return True


@dataclass
class MetricsSummary:
    """What ``fleetwatch status`` shows of one or more bridge workers."""

    workers: int = 0
    received: float = 0.0
    forwarded: float = 0.0
    acked: float = 0.0
    in_flight: float = 0.0
    kafka_failures: float = 0.0
    rejected: dict[str, float] = field(default_factory=dict)
    latency_sum: float = 0.0
    latency_count: float = 0.0

    @property
    def ack_latency_ms(self) -> float | None:
        """Mean receive → Kafka ack latency in milliseconds."""
        return 1000 * self.latency_sum / self.latency_count if self.latency_count else None

    def add(self, text: str) -> None:
        """Fold one worker's Prometheus text exposition into the summary."""
        self.workers += 1
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name, value = sample.name, sample.value
                if name == "fleetwatch_ingest_received_total":
                    self.received += value
                elif name == "fleetwatch_ingest_forwarded_total":
                    self.forwarded += value
                elif name == "fleetwatch_ingest_acked_total":
                    self.acked += value
                elif name == "fleetwatch_ingest_in_flight":
                    self.in_flight += value
                elif name == "fleetwatch_ingest_kafka_failures_total":
                    self.kafka_failures += value
                elif name == "fleetwatch_ingest_rejected_total" and value:
                    reason = sample.labels["reason"]
                    self.rejected[reason] = self.rejected.get(reason, 0.0) + value
                elif name == "fleetwatch_ingest_kafka_ack_latency_seconds_sum":
                    self.latency_sum += value
                elif name == "fleetwatch_ingest_kafka_ack_latency_seconds_count":
                    self.latency_count += value


def scrape(host: str, base_port: int, max_workers: int = 16, timeout: float = 1.0) -> MetricsSummary:
    """Summary of the bridge workers answering on ``base_port``, ``base_port + 1``, … (stops at the first gap)."""
    summary = MetricsSummary()
    for i in range(max_workers):
        try:
            with urllib.request.urlopen(f"http://{host}:{base_port + i}/metrics", timeout=timeout) as resp:
                summary.add(resp.read().decode())
        except OSError:
            break
    return summary

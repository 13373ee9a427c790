"""Settings for every Fleetwatch component, read from ``FLEETWATCH_*`` environment variables."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """All knobs in one place; each field maps to ``FLEETWATCH_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="FLEETWATCH_", extra="ignore")

    # Where processes keep their data, logs and pid files (never committed).
    run_dir: Path = PROJECT_ROOT / ".run"
    # Where fetched third-party artefacts (Kafka jars) are cached across runs.
    cache_dir: Path = PROJECT_ROOT / ".cache"

    # Kafka (KRaft, single node by default).
    kafka_host: str = "127.0.0.1"
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    kafka_heap: str = "512m"
    kafka_partitions: int = 4
    kafka_replication: int = 1
    # Nodes in the local KRaft cluster (1, or 3 for replication tests; ports step by 10 from kafka_port).
    kafka_brokers: int = 1
    kafka_min_insync: int = 1
    kafka_bootstrap: str | None = None
    topic_prefix: str = ""

    # Mosquitto.
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_client_prefix: str = "fleetwatch"
    # How long Mosquitto keeps the bridge's persistent session (and queues for it) while it is away.
    mqtt_session_expiry_s: int = 7 * 24 * 3600

    # Database: SQLite file unless a URL says otherwise.
    database_url: str | None = None
    # The project's own PostgreSQL (used by tests and when database_url points at it).
    pg_port: int = 55432
    pg_user: str = "fleetwatch"
    pg_db: str = "fleetwatch"

    # Operator web page / REST API.
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    # Ordering (issue 7): the API process relays its order outbox to Kafka and sends new-order webhooks;
    # `fleetwatch api serve` keeps a demo operator token in the run folder unless api_demo_token is off.
    api_relay: bool = True
    api_demo_token: bool = True
    orders_webhook_url: str | None = None
    orders_webhook_max_attempts: int = 5
    orders_webhook_timeout_s: float = 5.0

    # Ingest validation.
    max_payload_bytes: int = 256 * 1024
    max_samples_per_message: int = 2000
    max_future_skew_s: float = 300.0
    max_age_days: float = 400.0
    # Ingest bridge (issue 4): workers sharing $share/<group>/tractors/+/telemetry, flow control, metrics, TLS.
    ingest_workers: int = 1
    ingest_group: str = "ingest"
    # MQTT Receive Maximum: unacknowledged messages per worker. Acks wait for Kafka, so one worker forwards at most
    # this many per Kafka ack latency (5000 / 0.25 s under load = 20k msg/s); it is also the back-pressure bound.
    ingest_max_inflight: int = 5000
    # How long librdkafka waits to fill a batch: 25 ms batches cost Kafka a third of the CPU per record of 5 ms
    # ones and the bridge less too (bench-bridge); acks come ~20 ms later.
    ingest_kafka_linger_ms: float = 25.0
    ingest_metrics_port: int | None = None  # default mqtt_port + 100; worker i listens on port + i
    mqtt_tls_port: int = 0  # > 0 adds a TLS listener to our Mosquitto (certificates from deploy/mosquitto)
    mqtt_tls: bool = False  # bridge and simulator connect to the TLS listener, checking the local CA

    # Trend detection.
    trend_window_s: int = 3600
    trend_history_windows: int = 48
    trend_min_windows: int = 8
    trend_safety_margin_h: float = 48.0
    # Decoded tractor states a trends-detect worker keeps between batches (0 = none); about 0.1 MB each once a
    # tractor has weeks of history, so 10,000 is up to ~1 GB per worker process.
    trends_state_cache: int = 10_000
    # A function worker process runs a full garbage collection after this many young ones (CPython's default is
    # 10). A full collection walks every live object, the cached tractor states included: 0.3 s each with 1,000
    # tractors, a fifth of the trend worker's time (bench-trends), though the states hold no reference cycles for
    # it to find. 0 keeps CPython's default.
    functions_gc_full_every: int = 1000

    functions_file: Path | None = Field(default=None)

    @property
    def bootstrap(self) -> str:
        """Kafka bootstrap servers string."""
        if self.kafka_bootstrap:
            return self.kafka_bootstrap
        return ",".join(f"{self.kafka_host}:{self.kafka_port + 10 * i}" for i in range(self.kafka_brokers))

    @property
    def ingest_metrics_base(self) -> int:
        """HTTP port of bridge worker 0's Prometheus metrics (worker i uses this + i)."""
        return self.ingest_metrics_port or self.mqtt_port + 100

    @property
    def db_url(self) -> str:
        """SQLAlchemy URL of the database in use."""
        return self.database_url or f"sqlite:///{self.run_dir / 'fleetwatch.db'}"

    @property
    def pg_url(self) -> str:
        """URL of the project's own PostgreSQL server."""
        return f"postgresql+psycopg://{self.pg_user}@127.0.0.1:{self.pg_port}/{self.pg_db}"

    def topic(self, name: str) -> str:
        """Kafka topic name with the configured prefix (isolates test runs)."""
        return f"{self.topic_prefix}{name}"

    @cached_property
    def functions_path(self) -> Path:
        """The file that declares every function and its event-source mapping."""
        return self.functions_file or Path(__file__).with_name("functions.toml")


def get_settings() -> Settings:
    """Fresh settings from the current environment."""
    return Settings()

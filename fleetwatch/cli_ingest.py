"""``fleetwatch ingest``: run the MQTT→Kafka bridge."""

from __future__ import annotations

import typer

from fleetwatch.common import get_settings, setup_logging

ingest_app = typer.Typer(help="The MQTT→Kafka ingest bridge.", no_args_is_help=True)


@ingest_app.command("run")
def ingest_run() -> None:
    """Run one bridge process (MQTT → Kafka)."""
    from datetime import timedelta

    from ingest.bridge import Bridge, BridgeConfig
    from ingest.validate import Limits

    setup_logging()
    s = get_settings()
    limits = Limits(max_payload_bytes=s.max_payload_bytes, max_samples=s.max_samples_per_message,
                    max_future_skew=timedelta(seconds=s.max_future_skew_s), max_age=timedelta(days=s.max_age_days))
    config = BridgeConfig(mqtt_host=s.mqtt_host, mqtt_port=s.mqtt_port, bootstrap=s.bootstrap,
                          telemetry_topic=s.topic("telemetry"), dlq_topic=s.topic("telemetry.dlq"),
                          client_id=f"{s.mqtt_client_prefix}-{s.topic_prefix}bridge", limits=limits,
                          session_expiry_s=s.mqtt_session_expiry_s)
    Bridge(config).run()

"""MQTT→Kafka ingest bridge and the v1 telemetry contract (schema, validation, units)."""

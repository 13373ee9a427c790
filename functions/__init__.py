"""Lambda-style functions runtime: event-source mappings over Kafka with exactly-once database effects."""

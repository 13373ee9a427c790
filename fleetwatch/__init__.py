"""Settings, the `fleetwatch` CLI and the local stack that wire every component together."""

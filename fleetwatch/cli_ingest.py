"""``fleetwatch ingest`` (bridge workers, dead-letter tail) and ``fleetwatch devices`` (MQTT identities)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from fleetwatch.common import console, err, fail, get_settings, setup_logging
from fleetwatch.settings import Settings

if TYPE_CHECKING:
    from ingest.bridge import BridgeConfig
    from ingest.metrics import MetricsSummary

ingest_app = typer.Typer(help="The MQTT→Kafka ingest bridge.", no_args_is_help=True)
devices_app = typer.Typer(help="MQTT identities: per-tractor credentials (hashed) for Mosquitto.",
                          no_args_is_help=True)


def shared_group(s: Settings) -> str:
    """MQTT shared-subscription group of this stack's bridge workers (topic prefix keeps test runs apart)."""
    name = f"{s.topic_prefix}{s.ingest_group}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def bridge_config(s: Settings, index: int = 0) -> BridgeConfig:
    """Bridge settings of worker ``index``: stable client id, so a restarted worker resumes its session."""
    from fleetwatch.credentials import mqtt_endpoint, service_credentials
    from ingest.bridge import BridgeConfig
    from ingest.validate import Limits

    limits = Limits(max_payload_bytes=s.max_payload_bytes, max_samples=s.max_samples_per_message,
                    max_future_skew=timedelta(seconds=s.max_future_skew_s), max_age=timedelta(days=s.max_age_days))
    host, port, ca_file = mqtt_endpoint(s)
    username, password = service_credentials(s, "bridge")
    return BridgeConfig(mqtt_host=host, mqtt_port=port, bootstrap=s.bootstrap,
                        telemetry_topic=s.topic("telemetry"), dlq_topic=s.topic("telemetry.dlq"),
                        client_id=f"{s.mqtt_client_prefix}-{s.topic_prefix}bridge-{index}",
                        shared_group=shared_group(s), max_inflight=s.ingest_max_inflight, limits=limits,
                        session_expiry_s=s.mqtt_session_expiry_s, username=username, password=password,
                        ca_file=ca_file, metrics_port=s.ingest_metrics_base + index,
                        kafka_linger_ms=s.ingest_kafka_linger_ms)


def _supervise(workers: int) -> None:
    """Run ``workers`` bridge processes; restart one that dies, stop all on SIGTERM/SIGINT."""
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    exe = [sys.executable, "-m", "fleetwatch.cli", "ingest", "run", "--worker-index"]
    procs = {i: subprocess.Popen([*exe, str(i)]) for i in range(workers)}
    try:
        while not stopping:
            time.sleep(0.5)
            for i, p in list(procs.items()):
                if p.poll() is not None and not stopping:
                    err.print(f"bridge worker {i} exited with {p.returncode}; restarting it (same session)")
                    time.sleep(1)
                    procs[i] = subprocess.Popen([*exe, str(i)])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def retire_extra_workers(s: Settings, workers: int) -> None:
    """Drain and delete the sessions of worker indexes a previous, larger ``--workers`` left behind."""
    from dataclasses import replace

    from ingest.bridge import Bridge

    state = s.run_dir / "ingest" / f"workers-{shared_group(s)}.json"
    previous = json.loads(state.read_text()).get("workers", workers) if state.exists() else workers
    if not state.exists() and not s.topic_prefix:
        # A run folder from before shared subscriptions has one plain persistent session that still queues
        # every message: forward what it holds, then delete it.
        legacy = replace(bridge_config(s, 0), client_id=f"{s.mqtt_client_prefix}-bridge", shared_group=None,
                         metrics_port=None)
        Bridge(legacy).retire(idle_s=1.0)
    for index in range(workers, previous):
        err.print(f"draining the session of bridge worker {index} (scaled from {previous} to {workers} workers)")
        if not Bridge(replace(bridge_config(s, index), metrics_port=None)).retire():
            fail(f"bridge worker {index}'s session could not be drained; still {previous} workers' sessions")
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"workers": workers}))


@ingest_app.command("run")
def ingest_run(
    workers: Annotated[int, typer.Option(min=1, max=64, help="bridge processes sharing the subscription")] = 1,
    worker_index: Annotated[int | None, typer.Option(help="run only this worker (used by --workers)")] = None,
) -> None:
    """Run the MQTT → Kafka bridge: one process, or --workers N processes splitting the stream."""
    from fleetwatch.credentials import CredentialsError
    from ingest.bridge import Bridge

    setup_logging()
    s = get_settings()
    try:
        if worker_index is None:
            retire_extra_workers(s, workers)
        config = bridge_config(s, worker_index or 0)
    except CredentialsError as exc:
        fail(str(exc))
    if worker_index is None and workers > 1:
        _supervise(workers)
        return
    Bridge(config).run()


@ingest_app.command("dlq")
def ingest_dlq(
    tail: Annotated[bool, typer.Option("--tail", "-f", help="keep following new dead letters")] = False,
    last: Annotated[int, typer.Option(min=0, help="show this many recent dead letters per partition first")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw documents, one per line")] = False,
) -> None:
    """Show rejected telemetry from the dead-letter topic readably (reason, detail, original payload)."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    from ingest.deadletter import describe

    s = get_settings()
    topic = s.topic("telemetry.dlq")
    try:
        consumer = KafkaConsumer(bootstrap_servers=s.bootstrap, enable_auto_commit=False, group_id=None,
                                 request_timeout_ms=10_000)
    except KafkaError as exc:
        fail(f"cannot reach Kafka at {s.bootstrap}: {exc}")
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            fail(f"topic {topic} does not exist (start the stack: fleetwatch up)")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        ends = consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(ends[tp] - last, 0))
        remaining = {tp: ends[tp] for tp in tps}
        while True:
            batch = consumer.poll(timeout_ms=500)
            records = sorted((r for rs in batch.values() for r in rs), key=lambda r: r.timestamp)
            for r in records:
                try:
                    doc = json.loads(r.value)
                    line = json.dumps(doc) if as_json else describe(doc)
                except ValueError:
                    line = f"(unreadable dead letter at {r.topic}[{r.partition}]@{r.offset})"
                console.print(line, markup=False, highlight=False, soft_wrap=True)
            if not tail and all(consumer.position(tp) >= end for tp, end in remaining.items()):
                break
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


def metrics_summary(s: Settings) -> MetricsSummary:
    """Summary of the running bridge workers' Prometheus metrics (zero workers when none answers)."""
    from ingest.metrics import scrape

    return scrape(s.mqtt_host, s.ingest_metrics_base, max_workers=max(s.ingest_workers, 1) + 4, timeout=0.5)


def print_status(s: Settings) -> None:
    """One line for ``fleetwatch status``: the bridge workers' counters."""
    m = metrics_summary(s)
    if not m.workers:
        console.print(f"ingest: no bridge metrics on {s.mqtt_host}:{s.ingest_metrics_base}")
        return
    rejected = ", ".join(f"{k} {v:.0f}" for k, v in sorted(m.rejected.items(), key=lambda kv: -kv[1])[:5]) or "none"
    latency = f"{m.ack_latency_ms:.1f} ms" if m.ack_latency_ms is not None else "—"
    console.print(f"ingest ({m.workers} worker(s), metrics :{s.ingest_metrics_base}): received {m.received:.0f} · "
                  f"forwarded {m.forwarded:.0f} · in flight {m.in_flight:.0f} · Kafka ack latency {latency} · "
                  f"Kafka failures {m.kafka_failures:.0f} · rejected: {rejected}")


# ------------------------------------------------------------------ devices
@devices_app.command("add")
def devices_add(
    tractor_id: str,
    password_stdin: Annotated[bool, typer.Option(help="read the password from stdin instead of generating one")]
    = False,
) -> None:
    """Register a tractor; prints its generated password once (only a hash is stored)."""
    from fleetwatch.credentials import registry, reload_mosquitto
    from ingest.devices import DeviceError

    s = get_settings()
    password = sys.stdin.readline().strip() if password_stdin else None
    if password_stdin and len(password or "") < 12:
        fail("the password must be at least 12 characters")
    try:
        issued = registry(s).add_tractor(tractor_id, password)
    except DeviceError as exc:
        fail(str(exc))
    live = reload_mosquitto(s)
    err.print(f"{tractor_id} registered; it may publish only under tractors/{tractor_id}/"
              + ("" if live else " (Mosquitto not running: takes effect at its next start)"))
    if not password_stdin:
        err.print("password (shown once, store it on the tractor):")
        typer.echo(issued)


@devices_app.command("list")
def devices_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List tractors and service users with their state (never passwords)."""
    from dataclasses import asdict

    from fleetwatch.credentials import registry

    devices = registry(get_settings()).list()
    if as_json:
        typer.echo(json.dumps([{**asdict(d), "active": d.active} for d in devices]))
        return
    table = Table("username", "kind", "added", "state")
    for d in devices:
        table.add_row(d.username, d.kind, d.added_at or "—",
                      "[green]active[/green]" if d.active else f"[red]revoked {d.revoked_at}[/red]")
    console.print(table)


@devices_app.command("revoke")
def devices_revoke(tractor_id: str) -> None:
    """Revoke a tractor's credentials; Mosquitto drops its connection when it reloads."""
    from fleetwatch.credentials import registry, reload_mosquitto
    from ingest.devices import DeviceError

    s = get_settings()
    try:
        registry(s).revoke(tractor_id)
    except DeviceError as exc:
        fail(str(exc))
    live = reload_mosquitto(s)
    err.print(f"{tractor_id} revoked" + (" and disconnected" if live else ""))

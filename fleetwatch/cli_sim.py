"""``fleetwatch simulate`` and ``fleetwatch replay``: publish a simulated fleet or a recorded CSV as telemetry."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fleetwatch.common import err, fail, get_settings
from fleetwatch.settings import Settings

if TYPE_CHECKING:
    from simulators.publish import Sink

sim_app = typer.Typer()


class Mode(StrEnum):
    """How the simulator connects to the broker."""

    gateway = "gateway"
    per_tractor = "per-tractor"


def connect(s: Settings, mode: Mode, client_id: str) -> Sink:
    """A broker connection for the simulator: the gateway service user, or each tractor's own credentials."""
    from fleetwatch.credentials import mqtt_endpoint, service_credentials, tractor_credentials
    from simulators.publish import Gateway, PerTractorConnections

    host, port, ca_file = mqtt_endpoint(s)
    if mode is Mode.per_tractor:
        return PerTractorConnections(host, port, client_id, lambda tid: tractor_credentials(s, tid), ca_file)
    user, password = service_credentials(s, "simulator")
    return Gateway(host, port, client_id, username=user, password=password, ca_file=ca_file)


def _parse_start(start: str | None) -> datetime | None:
    if start is None:
        return None
    try:
        ts = datetime.fromisoformat(start.replace("Z", "+00:00"))
    except ValueError:
        fail(f"--start {start!r} is not an ISO-8601 time like 2026-06-01T00:00:00Z")
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _progress(label: str) -> Progress:
    return Progress(TextColumn("[bold]" + label + "[/bold] {task.description}"), BarColumn(),
                    TextColumn("{task.percentage:>5.1f}% · {task.fields[msgs]} messages"), TimeElapsedColumn(),
                    console=err, transient=False)


def run_simulation(s: Settings, scenario: str, tractors: int | None, days: float | None, seed: int | None,
                   period_s: float | None, truth: Path | None, speed: float, degrading: int | None, *,
                   start: datetime | None = None, out: Path | None = None, mode: Mode = Mode.gateway,
                   quiet: bool = False) -> tuple[int, dict[str, Any]]:
    """Build scenario ``scenario`` and publish it (or write it to ``out``); returns (messages, ground truth)."""
    from fleetwatch.db import CATALOG, CatalogError, load_catalog
    from simulators.publish import FileSink, run_fleet
    from simulators.scenario import ScenarioError, build, load

    try:
        catalog = load_catalog(CATALOG)
    except CatalogError as exc:
        fail(str(exc))
    try:
        sc = load(scenario)
        if start is None and 0 < speed <= 1:
            # real time (or slower) starts now; faster runs end about now, so no timestamp lies in the future
            start = datetime.now(UTC).replace(microsecond=0)
        fleet, days_, period = build(sc, tractors=tractors, days=days, seed=seed, period_s=period_s,
                                     degrading=degrading, start=start, catalog=catalog)
    except ScenarioError as exc:
        fail(str(exc))
    # paced at most real time, timestamps stay behind the wall clock if the run starts by now; faster runs must
    # end by now
    last = fleet.start if 0 < speed <= 1 else fleet.start + timedelta(days=days_)
    if out is None and last > datetime.now(UTC) + timedelta(minutes=5):
        fail(f"the run would publish timestamps up to {last:%Y-%m-%d %H:%M} UTC, in the future: the ingest bridge "
             "rejects them; pick an earlier --start, use --speed 1 (real time) or --out to write a file")
    sink: Sink
    try:
        if out is not None:
            sink = FileSink(out)
        else:
            sink = connect(s, mode, f"{s.mqtt_client_prefix}-sim-{fleet.seed}-{time.time_ns()}")
    except (OSError, ConnectionError) as exc:
        fail(f"cannot publish to MQTT broker {s.mqtt_host}:{s.mqtt_port}: {exc}" if out is None else str(exc))
    try:
        if quiet:
            result = run_fleet(fleet, sink, days_, period, speed)
        else:
            with _progress("simulating") as bar:
                task = bar.add_task(f"{sc.name}: {fleet.n} tractors × {days_:g} days", total=1.0, msgs=0)
                result = run_fleet(fleet, sink, days_, period, speed,
                                   progress=lambda frac, n: bar.update(task, completed=frac, msgs=n))
    finally:
        sink.close()
    ground_truth = fleet.truth()
    if truth:
        truth.write_text(json.dumps(ground_truth, indent=1))
    rate = result.readings / result.seconds if result.seconds > 0 else 0.0
    verb = "published" if out is None else f"wrote to {out}"  # tests/test_end_to_end.py reads "published N"
    err.print(f"{verb} {result.messages} messages ({result.samples} samples, {result.readings} readings) "
              f"in {result.seconds:.1f}s ({rate:,.0f} readings/s)"
              + (f"; fell behind real time by up to {result.lag_s:.1f}s" if speed > 0 and result.lag_s > 1 else ""))
    return result.messages, ground_truth


@sim_app.command()
def simulate(
    scenario: Annotated[str, typer.Option(
        help="shipped scenario (oil-pump-demo, healthy, mixed-wear, sensor-faults, stress) or a .toml path")]
    = "oil-pump-demo",
    tractors: Annotated[int | None, typer.Option(min=1, help="fleet size (default: the scenario's)")] = None,
    days: Annotated[float | None, typer.Option(min=0.001, help="simulated days (default: the scenario's)")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed (default: the scenario's)")] = None,
    period_s: Annotated[float | None, typer.Option("--period", min=0.1,
                                                   help="simulated seconds between samples")] = None,
    degrading: Annotated[int | None, typer.Option(min=0, help="oil-pump-demo: tractors whose part wears")] = None,
    speed: Annotated[float, typer.Option(min=0, help="simulated s per wall s; 0 = as fast as possible, "
                                                     "1 = real time starting now, 3600 = an hour a second")] = 0.0,
    start: Annotated[str | None, typer.Option(help="simulated start, ISO-8601 (default: so the run ends now)")]
    = None,
    truth: Annotated[Path | None, typer.Option(help="write ground truth JSON here")] = None,
    out: Annotated[Path | None, typer.Option(help="write JSON lines here instead of publishing to MQTT")] = None,
    mode: Annotated[Mode, typer.Option(help="gateway: one connection; per-tractor: one per tractor")]
    = Mode.gateway,
) -> None:
    """Publish a simulated fleet to MQTT (QoS 1) with ground truth, on an accelerated or real-time clock."""
    run_simulation(get_settings(), scenario, tractors, days, seed, period_s, truth, speed, degrading,
                   start=_parse_start(start), out=out, mode=mode)


@sim_app.command()
def replay(
    csv_file: Annotated[Path, typer.Argument(help="CSV of timestamped readings")],
    mapping: Annotated[Path, typer.Option("--map", help="TOML column mapping (docs/simulator.md)")],
    out: Annotated[Path | None, typer.Option(help="write JSON lines here instead of publishing to MQTT")] = None,
    mode: Annotated[Mode, typer.Option(help="gateway: one connection; per-tractor: one per tractor")]
    = Mode.gateway,
) -> None:
    """Replay a recorded CSV as tractor telemetry (column mapping with unit conversion), as fast as acked."""
    from ingest.contract import telemetry_topic
    from simulators.publish import FileSink
    from simulators.replay import Replay, ReplayError, load_mapping

    s = get_settings()
    try:
        rep = Replay(csv_file, load_mapping(mapping))
    except ReplayError as exc:
        fail(str(exc))
    sink: Sink
    try:
        sink = FileSink(out) if out is not None else connect(s, mode, f"{s.mqtt_client_prefix}-replay-{time.time_ns()}")
    except (OSError, ConnectionError) as exc:
        fail(f"cannot publish to MQTT broker {s.mqtt_host}:{s.mqtt_port}: {exc}" if out is None else str(exc))
    started = time.monotonic()
    try:
        with err.status("replaying") as status:
            for n, (tid, payload) in enumerate(rep.messages(), start=1):
                sink.publish(telemetry_topic(tid), payload)
                if n % 1000 == 0:
                    status.update(f"replaying: {rep.stats.rows:,} rows, {n:,} messages")
            sink.drain()
    except ReplayError as exc:
        fail(str(exc))
    finally:
        sink.close()
    st = rep.stats
    for problem in st.problems[:10]:
        err.print(f"[yellow]skipped:[/yellow] {problem}")
    err.print(f"replayed {st.rows} rows of {len(st.entities)} tractors as {st.messages} messages "
              f"({st.samples} samples) in {time.monotonic() - started:.1f}s; "
              f"skipped {st.skipped_rows} rows and {st.skipped_readings} readings")
    if st.samples == 0:
        fail("nothing in the file could be replayed with this mapping")

"""``fleetwatch simulate``: publish a simulated fleet with ground truth."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fleetwatch.common import err, fail, get_settings
from fleetwatch.settings import Settings

sim_app = typer.Typer()


def run_simulation(s: Settings, scenario: str, tractors: int, days: float, seed: int, period_s: float,
              truth: Path | None, speed: float, degrading: int) -> tuple[int, dict[str, object]]:
    from simulators.fleet import start_for
    from simulators.publish import Gateway, run_fleet
    from simulators.scenarios import ScenarioError, build

    try:
        fleet = build(scenario, tractors, days, seed, start_for(days), degrading=degrading)
    except ScenarioError as exc:
        fail(str(exc))
    ground_truth = fleet.truth(scenario, seed, days, period_s)
    if truth:
        truth.write_text(json.dumps(ground_truth, indent=2))
    gateway = Gateway(s.mqtt_host, s.mqtt_port, f"{s.mqtt_client_prefix}-sim-{seed}-{time.time_ns()}")
    try:
        with Progress(TextColumn("[bold]simulating[/bold] {task.description}"), BarColumn(),
                      TextColumn("{task.percentage:>5.1f}% · {task.fields[msgs]} messages"), TimeElapsedColumn(),
                      console=err, transient=False) as bar:
            task = bar.add_task(f"{tractors} tractors × {days:g} days", total=1.0, msgs=0)
            result = run_fleet(fleet, gateway, days, period_s, speed,
                               progress=lambda frac, n: bar.update(task, completed=frac, msgs=n))
    finally:
        gateway.close()
    err.print(f"published {result.messages} messages ({result.readings} readings) in {result.seconds:.1f}s")
    return result.messages, ground_truth


@sim_app.command()
def simulate(
    scenario: Annotated[str, typer.Option(help="oil-pump-demo | healthy")] = "oil-pump-demo",
    tractors: Annotated[int, typer.Option(min=1)] = 20,
    days: Annotated[float, typer.Option(min=1.01)] = 20.0,
    seed: int = 7,
    period_s: Annotated[float, typer.Option("--period", min=1, help="simulated seconds between samples")] = 600.0,
    degrading: Annotated[int, typer.Option(min=0, help="tractors whose part wears")] = 1,
    speed: Annotated[float, typer.Option(min=0, help="simulated s per wall s; 0 = as fast as possible")] = 0.0,
    truth: Annotated[Path | None, typer.Option(help="write ground truth JSON here")] = None,
) -> None:
    """Publish a simulated fleet to MQTT (QoS 1) with an accelerated clock."""
    run_simulation(get_settings(), scenario, tractors, days, seed, period_s, truth, speed, degrading)

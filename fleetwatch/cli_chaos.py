"""``fleetwatch chaos`` (kill -9 every process during a run, then reconcile) and ``fleetwatch soak``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fleetwatch.common import console, fail, get_settings

chaos_app = typer.Typer()


@chaos_app.command()
def chaos(
    seed: Annotated[int, typer.Option(help="chooses the fleet, the invalid inputs and the kill moments")] = 7,
    tractors: Annotated[int | None, typer.Option(min=2, help="fleet size (default 8; 4 with --reduced)")] = None,
    days: Annotated[float | None, typer.Option(min=6, help="simulated days (default 12; 10 with --reduced)")] = None,
    kills: Annotated[int | None, typer.Option(min=0, help="kill -9 of each process, this many times each "
                                                          "(default 2; 1 with --reduced)")] = None,
    publish_s: Annotated[float | None, typer.Option(min=20, help="wall seconds the messages are spread over")]
    = None,
    retention_s: Annotated[float, typer.Option(min=0, help="the device re-publishes what it sent this many seconds "
                                                           "before a reconnect (0: off, to measure the loss)")]
    = 30.0,
    kafka_brokers: Annotated[int, typer.Option(min=1, max=3, help="1, or 3 for a replicated cluster")] = 1,
    victims: Annotated[str, typer.Option(help="comma-separated processes to kill (default: all of them)")]
    = "simulator,mosquitto,bridge,fn-trends,fn-ordering,kafka,postgres",
    reduced: Annotated[bool, typer.Option(help="the CI-sized run (every process killed once)")] = False,
    port_offset: Annotated[int, typer.Option(help="chaos stack ports = your FLEETWATCH_* ports + this")] = 300,
    keep: Annotated[bool, typer.Option(help="leave the chaos stack running afterwards")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the result here")] = None,
) -> None:
    """Run a fleet through the full stack while killing -9 each process in turn; reconcile; exit 1 on any loss."""
    from fleetwatch.chaos import VICTIMS, ChaosError, Plan, run_chaos

    chosen = tuple(v.strip() for v in victims.split(",") if v.strip())
    unknown = [v for v in chosen if v not in VICTIMS]
    if unknown or not chosen:
        fail(f"--victims: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VICTIMS)}")
    base = Plan.reduced(seed) if reduced else Plan(seed=seed)
    overrides = {k: v for k, v in {"tractors": tractors, "days": days, "kills": kills, "publish_s": publish_s}.items()
                 if v is not None}
    plan = Plan(**{**base.__dict__, **overrides, "retention_s": retention_s, "kafka_brokers": kafka_brokers,
                   "victims": chosen})
    from fleetwatch.stack import StackError

    try:
        result = run_chaos(plan, get_settings(), port_offset=port_offset, keep=keep,
                           say=lambda m: console.print(f"[dim]{m}[/dim]", highlight=False))
    except (ChaosError, StackError) as exc:
        fail(str(exc), code=1)
        return
    p = result.plan
    faults = Table("process", "kills", "back after (s, max)", title=f"Faults injected (seed {p.seed})")
    for victim in p.victims:
        mine = [k for k in result.kills if k.victim == victim]
        faults.add_row(victim, str(len(mine)), f"{max((k.recovered_s or 0.0) for k in mine):.1f}" if mine else "—")
    console.print(faults)
    table = Table("check", "expected", "found", "", "note",
                  title=f"Reconciliation: {p.tractors} tractors × {p.days:g} days, {len(result.kills)} kills")
    for c in result.checks:
        table.add_row(c.name, str(c.expected), str(c.found), "[green]ok[/green]" if c.ok else "[red]FAIL[/red]",
                      c.note)
    console.print(table)
    f = result.figures
    console.print(f"lost messages {f.get('lost_messages')} · lost readings {f.get('lost_readings')} · doubled readings "
                  f"{f.get('doubled_readings')} · duplicate orders {f.get('duplicate_orders')} · "
                  f"{f.get('wall_s')} s · details {f.get('result_file')}")
    if json_out:
        json_out.write_text(json.dumps(result.to_json(), indent=1, default=str))
    if not result.ok:
        raise typer.Exit(1)


@chaos_app.command()
def soak(
    duration: Annotated[float, typer.Option(min=60, help="wall seconds of steady load")] = 600.0,
    tractors: Annotated[int, typer.Option(min=1, help="tractors publishing one sample each per tick")] = 200,
    rate: Annotated[float, typer.Option(min=1, help="messages per second")] = 100.0,
    max_slope_mib_h: Annotated[float, typer.Option(help="fail when a process's RSS grows faster than this over "
                                                        "the second half (and by more than 16 MiB / 5 %)")] = 50.0,
    port_offset: Annotated[int, typer.Option(help="soak stack ports = your FLEETWATCH_* ports + this")] = 400,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the samples here")] = None,
) -> None:
    """Steady load for DURATION seconds; report each process's memory over time; exit 1 on unbounded growth."""
    from fleetwatch.chaos import ChaosError, run_soak
    from fleetwatch.stack import StackError

    try:
        report = run_soak(get_settings(), duration, tractors, rate, port_offset,
                          say=lambda m: console.print(f"[dim]{m}[/dim]", highlight=False))
    except (ChaosError, StackError) as exc:
        fail(str(exc), code=1)
        return
    table = Table("process", "PSS start MiB", "PSS end MiB", "max MiB", "slope 2nd half MiB/h", "rise 2nd half MiB", "",
                  title=f"Soak: {duration:.0f} s at {rate:g} msg/s ({report['published']} messages)")
    ok = True
    for name, r in report["processes"].items():
        # Unbounded growth: still climbing fast over the second half, by more than warm-up noise (caches and
        # the JVM heap fill up early and then stay put).
        grows = r["slope_mib_h"] > max_slope_mib_h and r["rise_2nd_half_mib"] > max(16.0, 0.05 * r["max_mib"])
        ok &= not grows
        table.add_row(name, f"{r['start_mib']:.0f}", f"{r['end_mib']:.0f}", f"{r['max_mib']:.0f}",
                      f"{r['slope_mib_h']:+.1f}", f"{r['rise_2nd_half_mib']:+.1f}",
                      "[red]GROWS[/red]" if grows else "[green]flat[/green]")
    console.print(table)
    if json_out:
        json_out.write_text(json.dumps(report, indent=1))
    if not ok or report.get("lost", 0):
        raise typer.Exit(1)


@chaos_app.command()
def audit(
    timeout_s: Annotated[float, typer.Option("--timeout", min=10, help="give up (without failing) after this long")]
    = 120.0,
) -> None:
    """pip-audit of the installed packages; exit 1 only for known vulnerabilities in our declared dependencies."""
    from fleetwatch.chaos import audit as run_audit
    from fleetwatch.settings import PROJECT_ROOT

    code, found, note = run_audit(PROJECT_ROOT / "pyproject.toml", timeout_s)
    if found:
        table = Table("package", "version", "vulnerability", "declared by us", title="pip-audit")
        for name, version, vuln, own in found:
            table.add_row(name, version, vuln, "[red]yes[/red]" if own else "no (transitive: not failing)")
        console.print(table)
    console.print(f"pip-audit: {note}; {len(found)} known vulnerabilities "
                  f"({sum(own for *_, own in found)} in declared dependencies)")
    if code:
        raise typer.Exit(code)

"""Issue 6's acceptance run: the full mixed-wear fleet end to end on the real stack, scored against its truth.

Starts Kafka, Mosquitto, PostgreSQL, the bridge and both functions on the bench ports (own run folder), publishes
``fleetwatch simulate --scenario mixed-wear --seed 7`` (500 tractors × 180 days) through MQTT, waits until the
trend and ordering functions have drained the topics, then runs ``fleetwatch evaluate``. Prints the evaluation
table and the pipeline's progress over time; writes ``bench/results/acceptance.json``.

    python -m bench.acceptance [--tractors N] [--days D] [--seed S] [--timeout-s T]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, bench_settings, console, report
from fleetwatch.db import upgrade
from fleetwatch.pipeline import Progress, end_offsets, ensure_topics, wait_drained
from fleetwatch.settings import PROJECT_ROOT
from fleetwatch.stack import Stack

WORKERS = ["bridge", "fn-trends", "fn-ordering"]
FLEETWATCH = str(Path(sys.executable).with_name("fleetwatch"))


def _sample(s: Any, progress: Progress, began: float) -> dict[str, Any]:
    """One point of the progress log: telemetry in Kafka and each function's lag."""
    return {"t_s": round(time.perf_counter() - began, 1),
            "telemetry": sum(end_offsets(s, s.topic("telemetry")).values()),
            "lag": {name: progress.lag(name) for name in progress.functions}, "load": os.getloadavg()[0]}


def main() -> None:
    """Command line: run the acceptance fleet and score it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tractors", type=int, default=None, help="fleet size (default: the scenario's 500)")
    ap.add_argument("--days", type=float, default=None, help="simulated days (default: the scenario's 180)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--timeout-s", type=float, default=4 * 3600, help="give up draining after this long")
    args = ap.parse_args()

    # A run folder of its own, emptied first: evaluate scores every order in the database.
    run = Path(os.environ.setdefault("FLEETWATCH_RUN_DIR", str(PROJECT_ROOT / ".run" / "acceptance")))
    s = bench_settings()
    Stack(s).down()
    shutil.rmtree(run, ignore_errors=True)
    os.environ["FLEETWATCH_DATABASE_URL"] = s.pg_url
    s = bench_settings()
    stack = Stack(s)
    stack.ensure_debian_packages()
    stack.start(["kafka", "mosquitto", "postgres"])
    upgrade(s.db_url)
    ensure_topics(s)
    stack.start(WORKERS)
    truth = run / "truth.json"
    log: list[dict[str, Any]] = []
    began = time.perf_counter()
    stop = threading.Event()

    def watch() -> None:
        progress = Progress(s)
        try:
            while not stop.wait(60.0):
                point = _sample(s, progress, began)
                log.append(point)
                console.print(f"[dim]{point['t_s']:7.0f}s telemetry {point['telemetry']:,} lag {point['lag']} "
                              f"load {point['load']:.1f}[/dim]")
        finally:
            progress.close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        cmd = [FLEETWATCH, "simulate", "--scenario", "mixed-wear", "--seed", str(args.seed), "--truth", str(truth)]
        cmd += ["--tractors", str(args.tractors)] if args.tractors else []
        cmd += ["--days", str(args.days)] if args.days else []
        console.print(" ".join(cmd[1:]))
        subprocess.run(cmd, check=True, env=os.environ.copy())
        published_s = time.perf_counter() - began
        doc = json.loads(truth.read_text())
        wait_drained(s, int(doc["messages"]), timeout=args.timeout_s)
        drained_s = time.perf_counter() - began
    finally:
        stop.set()
        watcher.join(timeout=5)
        stack.stop(WORKERS)
    scored = subprocess.run([FLEETWATCH, "evaluate", "--truth", str(truth), "--json"], capture_output=True,
                            text=True, env=os.environ.copy(), check=True)
    score = json.loads(scored.stdout)
    subprocess.run([FLEETWATCH, "evaluate", "--truth", str(truth)], env=os.environ.copy(), check=False)
    stack.down()
    rows = [["wear episodes due", score["episodes"]], ["recall", f"{100 * score['recall']:.1f} %"],
            ["on time where the onset allowed it", f"{100 * score['on_time_feasible_rate']:.1f} %"],
            ["on time of all ordered", f"{100 * score['on_time_rate']:.1f} %"],
            ["false orders per 1,000 tractor-months",
             f"{score['false_per_1000_tractor_months']:.2f} ({score['false_orders']} orders)"],
            ["duplicate orders", score["duplicates"]], ["messages", doc["messages"]],
            ["published in", f"{published_s:.0f} s"], ["drained in", f"{drained_s:.0f} s"]]
    RESULTS.mkdir(parents=True, exist_ok=True)
    report("acceptance", f"mixed-wear end to end on the real stack (seed {args.seed})", ["figure", "value"], rows,
           {"score": score, "progress": log, "published_s": published_s, "drained_s": drained_s,
            "messages": doc["messages"], "tractors": len(doc["tractors"])})


if __name__ == "__main__":
    main()

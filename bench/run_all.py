"""Runs every benchmark, then writes bench/results/SUMMARY.md and PNG plots from their JSON files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.common import RESULTS, console

BENCH = Path(__file__).parent


def run_each() -> dict[str, int]:
    """Run each ``bench/bench_*.py`` as ``python -m bench.<name>``; return exit codes."""
    codes = {}
    for path in sorted(BENCH.glob("bench_*.py")):
        console.rule(path.stem)
        codes[path.stem] = subprocess.run([sys.executable, "-m", f"bench.{path.stem}"]).returncode
    return codes


def _table(doc: dict) -> list[str]:
    cols = doc.get("columns", [])
    lines = [f"### {doc.get('title', doc.get('benchmark'))}", "", "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    for row in doc.get("rows", []):
        lines.append("| " + " | ".join(f"{v:,.2f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return [*lines, ""]


def plots() -> list[str]:
    """Throughput against fleet size and latency percentiles from e2e.json, when present."""
    e2e = RESULTS / "e2e.json"
    if not e2e.exists():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(e2e.read_text())["results"]
    sizes = [r["tractors"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sizes, [r["readings_per_s"] for r in results], "o-", label="sustained readings/s")
    ax.plot(sizes, [n * 12 for n in sizes], "--", label="offered (12 readings × 1 Hz)")
    ax.set_xlabel("tractors")
    ax.set_ylabel("readings/s")
    ax.legend()
    ax.set_title("End-to-end throughput against fleet size")
    fig.tight_layout()
    fig.savefig(RESULTS / "throughput.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("latency_trend_p50_s", "p50"), ("latency_trend_p99_s", "p99"),
                       ("latency_trend_max_s", "max")):
        ax.plot(sizes, [r[key] for r in results], "o-", label=label)
    ax.axhline(2.0, color="grey", linestyle=":", label="target p99 2 s")
    ax.set_xlabel("tractors")
    ax.set_ylabel("publish → trend row, s")
    ax.legend()
    ax.set_title("Latency percentiles")
    fig.tight_layout()
    fig.savefig(RESULTS / "latency.png")
    return ["![throughput](throughput.png)", "", "![latency](latency.png)", ""]


def _targets(docs: list[dict]) -> list[str]:
    """One table of every benchmark's targets (the ``targets`` list in its JSON): met, or missed by how much."""
    rows = [(d.get("benchmark", "?"), t) for d in docs for t in d.get("targets", [])]
    if not rows:
        return []
    lines = ["## Targets", "", "| benchmark | target | measured | met |", "|---|---|---|---|"]
    for name, t in rows:
        lines.append(f"| {name} | {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
    return [*lines, "", "Where a target is missed, the benchmark's own table and its profile say where the time goes.",
            ""]


def summary() -> Path:
    """Markdown summary of every result file: the targets first, then each benchmark's table."""
    docs = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json"))]
    lines = ["# Benchmark summary", "", *_targets(docs), "## Results", ""]
    for doc in docs:
        lines += _table(doc)
        if doc.get("where_the_time_goes"):
            lines += ["Where the time goes:", "", "| tractors | process | CPU % | peak RSS MiB | top self time |",
                      "|---|---|---|---|---|"]
            lines += ["| " + " | ".join(f"{v:,.1f}" if isinstance(v, float) else str(v) for v in row) + " |"
                      for row in doc["where_the_time_goes"]]
            lines.append("")
    lines += plots()
    out = RESULTS / "SUMMARY.md"
    out.write_text("\n".join(lines))
    return out


if __name__ == "__main__":
    codes = run_each() if "--summary-only" not in sys.argv else {}
    console.print(f"summary: {summary()}")
    failed = [k for k, v in codes.items() if v]
    if failed:
        console.print(f"[red]failed benchmarks: {', '.join(failed)}[/red]")
        sys.exit(1)

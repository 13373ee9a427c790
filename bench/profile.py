"""Where a running process spends its time: py-spy samples summarised into the functions that dominate."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import RESULTS

RATE = 50  # samples per second: enough for shares, light on a busy 2-core box
OURS = ("fleetwatch/", "ingest/", "functions/", "trends/", "ordering/", "simulators/")
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def summarise(raw: str, top: int = 8) -> dict[str, Any]:
    """Self-time and inclusive shares per function from py-spy's raw (collapsed stack) output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        names = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame.strip())
            fn, file = (m["fn"], m["file"]) if m else (frame.strip(), "")
            short = file.split("site-packages/")[-1] if "site-packages/" in file else file.rsplit("/main/", 1)[-1]
            names.append(f"{fn} ({short})")
        if names:
            own[names[-1]] += n
            for name in set(names):
                if any(p in name for p in OURS):
                    inclusive[name] += n
    share = (lambda c: [[k, round(100 * v / total, 1)] for k, v in c.most_common(top)]) if total else (lambda c: [])
    return {"samples": total, "self_pct": share(own), "ours_inclusive_pct": share(inclusive)}


class Profiler:
    """Samples some processes for a while in the background (``start`` … ``result``); silent without py-spy."""

    def __init__(self, pids: dict[str, int], seconds: int, label: str) -> None:
        self.pids, self.seconds, self.label = pids, seconds, label
        self.results: dict[str, Any] = {}
        self.threads: list[threading.Thread] = []

    def _one(self, name: str, pid: int) -> None:
        exe = _py_spy()
        if exe is None:
            self.results[name] = {"error": "py-spy not installed (make bench installs it)"}
            return
        out = RESULTS / f"profile-{self.label}-{name}.txt"
        RESULTS.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([exe, "record", "--format", "raw", "--nonblocking", "--subprocesses", "-r", str(RATE),
                               "-d", str(self.seconds), "-p", str(pid), "-o", str(out)],
                              capture_output=True, text=True, timeout=self.seconds + 60)
        if proc.returncode != 0 or not out.exists():
            self.results[name] = {"error": (proc.stderr or proc.stdout).strip()[-300:]}
            return
        self.results[name] = {**summarise(out.read_text()), "raw": str(out.relative_to(RESULTS.parent.parent))}

    def start(self) -> Profiler:
        """Begin sampling every process."""
        for name, pid in self.pids.items():
            t = threading.Thread(target=self._one, args=(name, pid), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def result(self) -> dict[str, Any]:
        """Wait for the samplers and return their summaries by process name."""
        for t in self.threads:
            t.join(self.seconds + 90)
        return self.results

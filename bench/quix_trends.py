"""Peer baseline: the trend computation (per tractor × signal window means and slope) in Quix Streams."""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from datetime import datetime
from typing import Any

import numpy as np
from quixstreams import Application


def _event_ms(value: dict[str, Any], headers: Any, timestamp: float, ttype: Any) -> int:
    return int(datetime.fromisoformat(value["samples"][0]["ts"].replace("Z", "+00:00")).timestamp() * 1000)


def main() -> None:
    """Consume ``--messages`` telemetry records and report throughput and per-record latency as JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--messages", type=int, required=True)
    ap.add_argument("--window-s", type=int, default=10)
    ap.add_argument("--grace-s", type=int, default=2)
    ap.add_argument("--history", type=int, default=48)
    ap.add_argument("--group", help="consumer group (default: a new one)")
    ap.add_argument("--start-at", type=float, default=0.0,
                    help="epoch s: hold the first record until then, so every process of a pool joins first")
    ap.add_argument("--idle-stop-s", type=float, default=0.0,
                    help="stop after this long without a record (one process of a pool sees a share only)")
    args = ap.parse_args()

    state_dir = tempfile.mkdtemp(prefix="quix-state-")
    app = Application(broker_address=args.bootstrap, consumer_group=args.group or f"quix-{args.topic}-{time.time_ns()}",
                      auto_offset_reset="earliest", state_dir=state_dir, use_changelog_topics=False,
                      auto_create_topics=True)
    topic = app.topic(args.topic, value_deserializer="json", timestamp_extractor=_event_ms)
    sdf = app.dataframe(topic)
    seen: dict[str, Any] = {"n": 0, "first": 0.0, "last": 0.0, "last_wall": 0.0, "lat": []}

    def count(value: dict[str, Any], key: Any, timestamp: int, headers: Any) -> None:
        if seen["n"] == 0:
            time.sleep(max(0.0, args.start_at - time.time()))
        now = time.time()
        if seen["n"] == 0:
            seen["first"] = time.perf_counter()
        seen["n"] += 1
        seen["last"] = time.perf_counter()
        seen["last_wall"] = now
        seen["lat"].append(now - timestamp / 1000)  # live runs stamp event time = produce time
        if seen["n"] >= args.messages:
            app.stop()

    sdf = sdf.update(count, metadata=True)

    def init(value: dict[str, Any]) -> dict[str, list[float]]:
        return {s: [1, float(x)] for s, x in value["samples"][0]["readings"].items()}

    def reduce(agg: dict[str, list[float]], value: dict[str, Any]) -> dict[str, list[float]]:
        for s, x in value["samples"][0]["readings"].items():
            a = agg.setdefault(s, [0, 0.0])
            a[0] += 1
            a[1] += float(x)
        return agg

    sdf = sdf.tumbling_window(duration_ms=args.window_s * 1000, grace_ms=args.grace_s * 1000).reduce(
        reducer=reduce, initializer=init).final()

    def slope(window: dict[str, Any], state: Any) -> dict[str, float]:
        hist: dict[str, list[list[float]]] = state.get("hist", {})
        out = {}
        for s, (n, total) in window["value"].items():
            h = hist.setdefault(s, [])
            h.append([window["start"] / 3.6e6, total / n])
            del h[:-args.history]
            if len(h) >= 3:
                arr = np.asarray(h)
                out[s] = float(np.polyfit(arr[:, 0], arr[:, 1], 1)[0])
        state.set("hist", hist)
        return out

    sdf = sdf.apply(slope, stateful=True)
    if args.idle_stop_s > 0:
        def watch() -> None:
            while not seen["n"] or time.time() - seen["last_wall"] < args.idle_stop_s:
                time.sleep(0.2)
            app.stop()

        threading.Thread(target=watch, daemon=True).start()
    app.run()
    elapsed = seen["last"] - seen["first"]
    lat = np.asarray(seen["lat"]) if seen["lat"] else np.zeros(1)
    print(json.dumps({"messages": seen["n"], "seconds": elapsed, "last_wall": seen["last_wall"],
                      "messages_per_s": seen["n"] / elapsed if elapsed > 0 else None,
                      "latency_p50_s": float(np.percentile(lat, 50)), "latency_p99_s": float(np.percentile(lat, 99)),
                      "latency_max_s": float(lat.max())}))


if __name__ == "__main__":
    main()

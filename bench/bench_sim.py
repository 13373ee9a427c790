"""Simulator throughput to the real Mosquitto in gateway mode, against a bare paho publish loop in the same run.

Three phases on one Mosquitto (started through fleetwatch.stack): (1) baseline: a bare paho QoS 1 loop
republishing pre-built simulator payloads; (2) the simulator flat out (``stress`` scenario: 10,000 tractors
at 1 Hz, 10 samples per message) — model, faults, network and JSON included; (3) the simulator in real-time
mode (speed 1) for a while, reporting whether it kept up. A separate process subscribed to
``tractors/+/telemetry`` counts what the broker delivered, to compare with what was published.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt

from bench.common import bench_settings, bench_stack, console, report
from fleetwatch.credentials import mqtt_endpoint, service_credentials
from fleetwatch.settings import Settings
from ingest.contract import telemetry_topic
from simulators.publish import Gateway, run_fleet
from simulators.scenario import build, load

READINGS_PER_SAMPLE = 13


def _count(host: str, port: int, user: str, password: str, ca: str | None, counter: Any, ready: Any,
           stop: Any) -> None:
    """Subscriber process: count telemetry messages the broker delivers."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sim-counter-{time.time_ns()}",
                         protocol=mqtt.MQTTv311)
    client.username_pw_set(user, password)
    if ca:
        client.tls_set(ca_certs=ca)

    def on_connect(c: mqtt.Client, *_: object) -> None:
        c.subscribe("tractors/+/telemetry", qos=1)

    def on_subscribe(*_: object) -> None:
        ready.set()

    def on_message(*_: object) -> None:
        with counter.get_lock():
            counter.value += 1

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect(host, port, keepalive=30)
    client.loop_start()
    stop.wait()
    client.disconnect()
    client.loop_stop()


class BrokerCounter:
    """A subscriber in its own process (so it does not share the publisher's GIL) counting telemetry."""

    def __init__(self, s: Settings) -> None:
        host, port, ca = mqtt_endpoint(s)
        user, password = service_credentials(s, "bridge")
        ctx = mp.get_context("spawn")
        self.value = ctx.Value("q", 0)
        ready, self.stop = ctx.Event(), ctx.Event()
        self.proc = ctx.Process(target=_count, args=(host, port, user, password, ca, self.value, ready, self.stop),
                                daemon=True)
        self.proc.start()
        if not ready.wait(30):
            raise RuntimeError("counting subscriber did not subscribe within 30 s")

    def count(self) -> int:
        """Messages delivered so far."""
        return int(self.value.value)

    def settle(self, expected: int, timeout: float = 120.0) -> int:
        """Wait until ``expected`` messages arrived or the count stops moving; return the count."""
        deadline, last, still = time.monotonic() + timeout, -1, 0.0
        while time.monotonic() < deadline:
            n = self.count()
            if n >= expected:
                return n
            if n == last:
                still += 0.5
                if still >= 10:
                    return n
            else:
                last, still = n, 0.0
            time.sleep(0.5)
        return self.count()

    def close(self) -> None:
        """Stop the subscriber process."""
        self.stop.set()
        self.proc.join(10)


def _gateway(s: Settings, name: str) -> Gateway:
    host, port, ca = mqtt_endpoint(s)
    user, password = service_credentials(s, "simulator")
    return Gateway(host, port, f"bench-sim-{name}-{time.time_ns()}", username=user, password=password, ca_file=ca)


def baseline(s: Settings, tractors: int, seconds: int) -> tuple[int, int, float]:
    """Bare paho loop: publish pre-built simulator payloads (10 samples each) QoS 1, wait for every ack."""
    sc = load("stress")
    k = sc.network.samples_per_message
    fleet, _, period = build(sc, tractors=tractors, days=3 * k / 86_400,
                             start=datetime.now(UTC) - timedelta(minutes=5))
    # steady-state messages only (after the first k staggered steps, before the final flush): k samples each
    steps = [msgs for _, msgs in fleet.run(3 * k / 86_400, period)]
    payloads = [(telemetry_topic(tid), p) for msgs in steps[k:2 * k] for tid, p in msgs]
    readings_each = sum(p.count(b'":') - 4 - 3 * p.count(b'"ts":') for _, p in payloads) / len(payloads)
    total = tractors * seconds // k
    host, port, ca = mqtt_endpoint(s)
    user, password = service_credentials(s, "simulator")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sim-paho-{time.time_ns()}",
                         protocol=mqtt.MQTTv311)
    client.username_pw_set(user, password)
    if ca:
        client.tls_set(ca_certs=ca)
    client.max_inflight_messages_set(1000)
    acked = [0]
    client.on_publish = lambda *_: acked.__setitem__(0, acked[0] + 1)
    client.connect(host, port)
    client.loop_start()
    t0 = time.perf_counter()
    for k in range(total):
        topic, payload = payloads[k % len(payloads)]
        client.publish(topic, payload, qos=1)
        while k - acked[0] > 4000:  # same bounded window as the simulator's gateway
            time.sleep(0.001)
    while acked[0] < total:
        time.sleep(0.005)
    elapsed = time.perf_counter() - t0
    client.disconnect()
    client.loop_stop()
    return total, int(total * readings_each), elapsed


def main() -> None:
    """Run the three phases and report."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tractors", type=int, default=10_000)
    ap.add_argument("--seconds", type=int, default=60, help="simulated seconds in the flat-out phase")
    ap.add_argument("--realtime-seconds", type=int, default=30, help="wall seconds of the real-time phase")
    args = ap.parse_args()
    bench_settings()
    rows: list[list[Any]] = []
    results: dict[str, Any] = {"tractors": args.tractors, "rate_hz": 1.0, "samples_per_message": 10,
                               "load_average_before": os.getloadavg()}
    with bench_stack(["mosquitto"]) as s:
        counter = BrokerCounter(s)
        try:
            before = counter.count()
            msgs, readings, secs = baseline(s, args.tractors, args.seconds)
            got = counter.settle(before + msgs) - before
            base_rps = readings / secs
            rows.append(["bare paho loop (baseline)", "-", secs, msgs, got, readings, msgs / secs, base_rps, 1.0])
            results["baseline"] = {"messages": msgs, "received": got, "readings": readings, "seconds": secs}

            sc = load("stress")
            days = args.seconds / 86_400
            fleet, _, period = build(sc, tractors=args.tractors, days=days,
                                     start=datetime.now(UTC) - timedelta(seconds=args.seconds + 60))
            gw = _gateway(s, "flat")
            before = counter.count()
            try:
                res = run_fleet(fleet, gw, days, period)
            finally:
                gw.close()
            got = counter.settle(before + res.messages) - before
            rps = res.readings / res.seconds
            rows.append(["simulator, flat out", args.seconds, res.seconds, res.messages, got, res.readings,
                         res.messages / res.seconds, rps, rps / base_rps])
            results["flat_out"] = {"messages": res.messages, "received": got, "readings": res.readings,
                                   "samples": res.samples, "seconds": res.seconds}

            days = args.realtime_seconds / 86_400
            fleet, _, period = build(sc, tractors=args.tractors, days=days, start=datetime.now(UTC))
            gw = _gateway(s, "realtime")
            before = counter.count()
            try:
                res = run_fleet(fleet, gw, days, period, speed=1.0)
            finally:
                gw.close()
            got = counter.settle(before + res.messages) - before
            rps = res.readings / res.seconds
            rows.append([f"simulator, real time (lag p99 {res.lag_p99_s:.2f} s, max {res.lag_s:.2f} s)",
                         args.realtime_seconds, res.seconds, res.messages, got, res.readings,
                         res.messages / res.seconds, rps, rps / base_rps])
            kept_up = res.lag_p99_s < 1.0  # at most one sampling period behind for 99 % of the steps
            results["real_time"] = {"messages": res.messages, "received": got, "readings": res.readings,
                                    "samples": res.samples, "seconds": res.seconds, "max_lag_s": res.lag_s,
                                    "p99_lag_s": res.lag_p99_s, "simulated_s": args.realtime_seconds,
                                    "kept_up": kept_up,
                                    "target_readings_per_s": args.tractors * READINGS_PER_SAMPLE}
        finally:
            counter.close()
    results["load_average_after"] = os.getloadavg()  # other work on the machine skews every number here
    report("sim", f"Simulator → Mosquitto, gateway mode, {args.tractors:,} tractors × 1 Hz (stress scenario)",
           ["run", "simulated s", "wall s (to last ack)", "published msgs", "broker delivered", "readings",
            "msgs/s", "readings/s", "ratio vs baseline"], rows, results)
    all_counted = all(r[3] == r[4] for r in rows)
    console.print(f"published == delivered in every phase: {all_counted}; real time kept up: {kept_up} "
                  f"(target {args.tractors * READINGS_PER_SAMPLE:,} readings/s)")


if __name__ == "__main__":
    main()

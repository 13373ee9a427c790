"""Detection quality: placed orders compared with the simulator's ground truth (recall, on time, false orders)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

DAYS_PER_MONTH = 30.4375
EVIDENCE_H = 24.0  # time after the onset a detector is allowed before an episode counts as orderable on time


def parse_ts(value: Any) -> datetime | None:
    """A timezone-aware datetime from an ISO-8601 string (or datetime); None when absent or unreadable."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=datetime.now().astimezone().tzinfo)
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass(frozen=True)
class Order:
    """What the evaluation needs of a placed order: who, which part, and when the wear was first detected."""

    tractor_id: str
    part_id: str
    detected_at: datetime  # event time (evidence.first_detected_at); the wall clock means nothing in a replay


@dataclass
class Episode:
    """One injected wear episode and how the pipeline answered it."""

    tractor_id: str
    part_id: str
    kind: str
    onset: datetime
    failure: datetime
    lead_time_h: float
    order: Order | None = None

    @property
    def feasible(self) -> bool:
        """True when the wear began early enough for an on-time order: lead time + a day of evidence before failure.

        Nothing can be ordered before the wear begins, so an onset less than the lead time before failure can never
        be on time; the extra day (``EVIDENCE_H``) is the least time a detector needs to tell a sudden step of wear
        from a spike or a noise burst when a tractor works some ten hours a day.
        """
        return self.onset + timedelta(hours=self.lead_time_h + EVIDENCE_H) <= self.failure

    @property
    def on_time(self) -> bool:
        """Ordered at least the part's lead time before the failure."""
        return self.order is not None and self.order.detected_at <= self.failure - timedelta(hours=self.lead_time_h)

    @property
    def lead_days(self) -> float | None:
        """Days between the first detection and the failure."""
        return None if self.order is None else (self.failure - self.order.detected_at).total_seconds() / 86400


@dataclass
class Report:
    """The evaluation's numbers plus the detail behind them."""

    tractors: int
    months: float
    episodes: list[Episode]
    not_due: int
    false_orders: list[Order]
    false_on_fault_tractors: int
    duplicates: int
    by_kind: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def ordered(self) -> int:
        """Due wear episodes with an order placed before the failure."""
        return sum(e.order is not None for e in self.episodes)

    @property
    def recall(self) -> float:
        """Share of due wear episodes that got an order."""
        return self.ordered / len(self.episodes) if self.episodes else 1.0

    @property
    def on_time_rate(self) -> float:
        """Share of ordered episodes ordered at least the lead time before failure."""
        ordered = [e for e in self.episodes if e.order is not None]
        return sum(e.on_time for e in ordered) / len(ordered) if ordered else 1.0

    @property
    def on_time_feasible_rate(self) -> float:
        """On-time share among ordered episodes whose onset left the lead time + 1 day to react."""
        ordered = [e for e in self.episodes if e.order is not None and e.feasible]
        return sum(e.on_time for e in ordered) / len(ordered) if ordered else 1.0

    @property
    def median_lead_days(self) -> float | None:
        """Median days from first detection to failure over ordered episodes."""
        leads = [e.lead_days for e in self.episodes if e.lead_days is not None]
        return statistics.median(leads) if leads else None

    @property
    def tractor_months(self) -> float:
        """Observed tractor-months (every tractor, the whole run)."""
        return self.tractors * self.months

    @property
    def false_per_1000(self) -> float:
        """Orders matching no wear episode per 1,000 tractor-months."""
        return 1000.0 * len(self.false_orders) / self.tractor_months if self.tractor_months else 0.0

    def rows(self) -> list[tuple[str, str]]:
        """The summary as (metric, value) rows, in the order the README table shows them."""
        lead = self.median_lead_days
        feasible = sum(e.feasible for e in self.episodes)
        return [
            ("wear episodes due in the run", str(len(self.episodes))),
            ("ordered (before failure)", str(self.ordered)),
            ("recall", f"{100 * self.recall:.1f} %"),
            ("on time (≥ lead time before failure), of all ordered", f"{100 * self.on_time_rate:.1f} %"),
            (f"on time where the onset allowed it (onset ≥ lead time + 1 day before failure: {feasible} episodes;"
             " the target)", f"{100 * self.on_time_feasible_rate:.1f} %"),
            ("median lead time", f"{lead:.1f} days" if lead is not None else "—"),
            ("false orders", f"{len(self.false_orders)} ({self.false_on_fault_tractors} on sensor-fault tractors)"),
            ("false orders per 1,000 tractor-months", f"{self.false_per_1000:.2f}"),
            ("duplicate orders", str(self.duplicates)),
            ("tractor-months observed", f"{self.tractor_months:.0f}"),
            ("wear episodes not yet due at the end (ignored)", str(self.not_due)),
        ]


def evaluate(truth: dict[str, Any], orders: list[Order], lead_times_h: dict[str, float]) -> Report:
    """Match orders to ground-truth wear episodes by (tractor, part) and score them.

    An episode is *due* when its order should have been placed within the run (failure − lead time ≤ end).
    An order matches an episode of its (tractor, part) when it was first detected between the onset and the
    failure; orders matching no episode (due or not) are false; more than one order per episode is a duplicate.
    """
    start, end = parse_ts(truth["start"]), parse_ts(truth["end"])
    if start is None or end is None:
        raise ValueError("ground truth needs 'start' and 'end' timestamps")
    months = (end - start).total_seconds() / 86400 / DAYS_PER_MONTH
    by_key: dict[tuple[str, str], list[Order]] = {}
    for o in sorted(orders, key=lambda o: o.detected_at):
        by_key.setdefault((o.tractor_id, o.part_id), []).append(o)
    episodes: list[Episode] = []
    not_due = 0
    used: set[int] = set()
    duplicates = 0
    for w in truth.get("wear", []):
        onset, failure = parse_ts(w["onset"]), parse_ts(w["failure_time"])
        if onset is None or failure is None:
            raise ValueError(f"wear entry without onset/failure_time: {w}")
        lead = float(lead_times_h.get(w["part_id"], 0.0))
        ep = Episode(w["tractor_id"], w["part_id"], w.get("kind", "?"), onset, failure, lead)
        matches = [o for o in by_key.get((ep.tractor_id, ep.part_id), []) if onset <= o.detected_at <= failure]
        for o in by_key.get((ep.tractor_id, ep.part_id), []):
            if onset <= o.detected_at:
                used.add(id(o))  # an order after the failure is late, not false
        if matches:
            ep.order = matches[0]
            duplicates += len(matches) - 1
        if failure - timedelta(hours=lead) > end:
            not_due += 1
            continue
        episodes.append(ep)
    false_orders = [o for lst in by_key.values() for o in lst if id(o) not in used]
    faulty = {f["tractor_id"] for f in truth.get("faults", [])}
    on_faulty = sum(o.tractor_id in faulty for o in false_orders)
    report = Report(tractors=len(truth.get("tractors", [])), months=months, episodes=episodes, not_due=not_due,
                    false_orders=false_orders, false_on_fault_tractors=on_faulty, duplicates=duplicates)
    for kind in sorted({e.kind for e in episodes}):
        eps = [e for e in episodes if e.kind == kind]
        ordered = [e for e in eps if e.order is not None]
        report.by_kind[kind] = {"episodes": len(eps), "ordered": len(ordered),
                                "on_time": sum(e.on_time for e in ordered),
                                "feasible": sum(e.feasible for e in eps),
                                "on_time_feasible": sum(e.on_time and e.feasible for e in ordered)}
    return report

"""Dead-letter documents for ``telemetry.dlq``: original bytes, topic, reason codes, detail, receive time."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime
from typing import Any

from ingest.validate import Verdict, format_ts

# Kafka's default record limit is 1 MiB; base64 grows bytes by 4/3, so keep the copy well below it.
MAX_ORIGINAL_BYTES = 512 * 1024
MAX_LISTED_REJECTIONS = 100


def dead_letter(topic: str, payload: bytes, verdict: Verdict, received_at: datetime, bridge: str = "",
                max_original_bytes: int = MAX_ORIGINAL_BYTES) -> dict[str, Any]:
    """One DLQ document for a message with rejections (whole message or some of its samples).

    ``reason``/``detail`` name the first problem; ``rejections`` lists each one (sample index or None for
    the whole message). The original payload is kept base64-encoded, truncated only past
    ``max_original_bytes`` (then ``payload_truncated`` is true and ``payload_sha256`` identifies it).
    """
    first = verdict.rejections[0]
    kept = payload[:max_original_bytes]
    return {
        "reason": first.reason,
        "detail": first.detail,
        "rejections": [{"reason": r.reason, "detail": r.detail, "sample_index": r.sample_index}
                       for r in verdict.rejections[:MAX_LISTED_REJECTIONS]],
        "rejected_samples": sum(r.sample_index is not None for r in verdict.rejections),
        "accepted_samples": len(verdict.message["samples"]) if verdict.message else 0,
        "mqtt_topic": topic,
        "tractor_id": verdict.tractor_id,
        "seq": verdict.seq,
        "received_at": format_ts(received_at),
        "bridge": bridge,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "payload_truncated": len(kept) < len(payload),
        "payload_b64": base64.b64encode(kept).decode(),
    }


def original_payload(doc: dict[str, Any]) -> bytes:
    """The (possibly truncated) original bytes of a dead-letter document."""
    return base64.b64decode(doc.get("payload_b64", ""))


def describe(doc: dict[str, Any], preview: int = 120) -> str:
    """One readable line for ``fleetwatch ingest dlq --tail``: time, topic, reason, detail, payload preview."""
    raw = original_payload(doc)
    text = raw[:preview].decode("utf-8", errors="replace").replace("\n", "\\n")
    more = "…" if len(raw) > preview or doc.get("payload_truncated") else ""
    reasons = sorted({r["reason"] for r in doc.get("rejections", [])} - {doc.get("reason")})
    extra = f" (+{', '.join(reasons)})" if reasons else ""
    samples = ""
    if doc.get("rejected_samples"):
        samples = f" [{doc['rejected_samples']} sample(s) rejected, {doc.get('accepted_samples', 0)} forwarded]"
    return (f"{doc.get('received_at', '?')} {doc.get('mqtt_topic', '?')} {doc.get('reason', '?')}{extra}: "
            f"{doc.get('detail', '')}{samples} | {doc.get('payload_bytes', len(raw))} B: {text}{more}")


def encode(doc: dict[str, Any]) -> bytes:
    """Compact JSON bytes of a dead-letter document."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()

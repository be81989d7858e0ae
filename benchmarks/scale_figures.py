"""What ``scale.py`` makes of its samples, its clients' reports and the applied log: pure figures.

A sample is one row of the series (``ServedRun.sample``): unix ``wall``, the status document's
``status_at``, ``applied`` and ``rejected``, the queue's ready ``depth``, the coordinator's CPU
seconds and RSS, the client processes' RSS. A report is what one client of ``scale_clients.py`` did.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from harness.oracle import judge
from shared.codecs import get_codec
from shared.snapshot_layout import SnapshotManifest

MB = 1e6


def window(samples: list[dict[str, Any]], start: float, stop: float) -> list[dict[str, Any]]:
    """The samples taken from ``start`` to ``stop`` (unix time): the measured part of a run."""
    return [s for s in samples if start <= s["wall"] <= stop]


def cpu_shares(samples: list[dict[str, Any]]) -> list[float]:
    """The coordinator's CPU seconds per second between consecutive samples (1.0 = one core)."""
    return [(b["coordinator_cpu_s"] - a["coordinator_cpu_s"]) / (b["wall"] - a["wall"])
            for a, b in zip(samples, samples[1:], strict=False) if b["wall"] > a["wall"]]


def applied_per_s(samples: list[dict[str, Any]]) -> float:
    """Applied deltas per second over ``samples``, on the status document's own clock."""
    rows = [s for s in samples if s["status_at"] is not None and s["applied"] is not None]
    if len(rows) < 2 or rows[-1]["status_at"] <= rows[0]["status_at"]:
        return 0.0
    return (rows[-1]["applied"] - rows[0]["applied"]) / (rows[-1]["status_at"] - rows[0]["status_at"])


def queue_figures(samples: list[dict[str, Any]], bound_depth: float) -> dict[str, Any]:
    """The queue's depth: max, last, the medians of the first and last thirds, and whether it is
    *bounded*: the last third not above the first by more than max(5, 10% of the max), and the max
    under 90% of ``bound_depth`` (what the queue's byte bound holds: past it the broker refuses
    publishes, and the bound, not the coordinator, keeps the depth where it is)."""
    depths = [s["depth"] for s in samples if s["depth"] is not None]
    if not depths:
        return {"depth_max": None, "depth_last": None, "depth_first_third": None, "depth_last_third": None,
                "depth_bound": round(bound_depth), "queue_bounded": False}
    third = max(1, len(depths) // 3)
    first, last = statistics.median(depths[:third]), statistics.median(depths[-third:])
    grows = last > first + max(5.0, 0.1 * max(depths))
    pinned = max(depths) >= 0.9 * bound_depth
    return {"depth_max": max(depths), "depth_last": depths[-1], "depth_first_third": first,
            "depth_last_third": last, "depth_bound": round(bound_depth),
            "queue_bounded": not grows and not pinned}


def oracle_figures(reports: dict[str, dict[str, Any]], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Applied deltas per client, rejections by reason, and the oracle's lost/doubled/unexpected."""
    confirmed = {i for r in reports.values() for i in r["confirmed"]}
    verdict = judge(confirmed, entries)
    per_client = Counter({cid: 0 for cid in reports})
    per_client.update(i.rsplit(":", 1)[0] for i in verdict.applied.elements())
    counts = list(per_client.values())
    reasons = Counter(reason for rs in verdict.rejected.values() for reason in rs)
    squares = sum(c * c for c in counts)
    return {
        "confirmed": len(confirmed), "applied": sum(verdict.applied.values()),
        "rejected": sum(reasons.values()),
        "rejected_by_reason": " ".join(f"{k}={v}" for k, v in sorted(reasons.items())) or "-",
        "duplicates": verdict.duplicates_seen, "lost": len(verdict.lost), "doubled": len(verdict.duplicated),
        "unexpected": len(verdict.unexpected),
        "client_applied_min": min(counts), "client_applied_median": statistics.median(counts),
        "client_applied_max": max(counts), "starved": sum(1 for c in counts if c == 0),
        "jain": round(sum(counts) ** 2 / (len(counts) * squares), 3) if squares else 0.0,
        "client_errors": sum(1 for r in reports.values() if r["error"]),
    }


def waiting_share(reports: dict[str, dict[str, Any]], seconds: float) -> float:
    """The share of the clients' time spent waiting for a version newer than their last base."""
    return round(sum(r["base_wait_s"] for r in reports.values()) / (len(reports) * seconds), 3)


def median(values: list[float]) -> float | None:
    """The median, None of nothing."""
    return statistics.median(values) if values else None


def mb(value: float | None) -> float | None:
    """Bytes in MB (10^6), one decimal."""
    return None if value is None else round(value / MB, 1)


def metric_mean(metrics: dict[str, float], name: str) -> tuple[int, float | None]:
    """A /metrics histogram's count and mean (None without observations)."""
    count = int(metrics.get(f"{name}_count", 0))
    return count, (round(metrics[f"{name}_sum"] / count, 3) if count else None)


def delta_bytes(manifest: SnapshotManifest, codec: str) -> int:
    """The encoded tensors of one delta of this model (the envelope adds a few hundred bytes)."""
    return sum(get_codec(codec).encoded_bytes(e.numel) for e in manifest.params)

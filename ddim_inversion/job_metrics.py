"""Service-wide job metrics kept in Redis (keys.JOB_METRICS_KEY), so that every gateway
exports the same: workers count a job's end and durations, gateways sum the buckets."""

from __future__ import annotations

DURATION_BUCKETS_S: tuple[float, ...] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
"""Upper bounds of the job duration histograms, in seconds (Prometheus `le`)."""


JOB_HISTOGRAMS = ("queue_wait", "run")
"""Histograms kept per job: seconds queued before a worker took it, and seconds running."""


def histogram_bound(seconds: float) -> str:
    """The label of the one bucket an observation falls in: its smallest upper bound."""
    return next((f"{bound:g}" for bound in DURATION_BUCKETS_S if seconds <= bound), "+Inf")


def histogram_field(name: str, seconds: float) -> str:
    """The field one observation of histogram `name` increments."""
    return f"{name}:in:{histogram_bound(seconds)}"

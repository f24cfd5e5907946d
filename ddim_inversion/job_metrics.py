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


OWNER_LABEL_CHARS = 12
"""Hex digits of an API key's SHA-256 that name its owner in metrics and settings: enough to
tell keys apart, too few to be the key's full hash."""

ANONYMOUS_LABEL = "anonymous"
"""The owner label of jobs submitted while auth is disabled."""


def owner_label(owner: str) -> str:
    """The short name of an owner (a key's SHA-256 hex) in metrics and settings."""
    return owner[:OWNER_LABEL_CHARS].lower() if owner else ANONYMOUS_LABEL

"""One router module per resource: inversions (the jobs) and health (probes, metrics)."""

"""Every Redis key and channel the service writes besides RQ's own, in one place.

Gateways and workers build names only through these: a key renamed here is renamed for
both sides.
"""

from __future__ import annotations

from typing import Any

QUEUE_NAME = "inversions"
"""The prefix of the RQ queues that gateways fill and workers drain: one queue per model."""


def queue_name_for(model: str, prefix: str = QUEUE_NAME) -> str:
    """The RQ queue of one model's jobs (`inversions:<model>`): the workers serving that
    model drain it and no other, so that a batch never mixes models."""
    return f"{prefix}:{model}"


KEY_PREFIX = "inversion:"
"""Prefix of every Redis key the service writes besides RQ's own."""


WORKERS_KEY = KEY_PREFIX + "workers"
"""Hash: worker name -> WorkerRecord JSON; how gateways learn that a model is loaded."""


MODELS_KEY = KEY_PREFIX + "models"
"""Hash: model name -> ModelInfo JSON of every model a worker ever announced, kept without
expiry: a model stays known (its jobs queue) while all its workers are down."""


THROUGHPUT_KEY = KEY_PREFIX + "throughput"
"""Hash: worker name -> {"images_per_s": EWMA, "cost_per_s": EWMA of job_cost per second,
"updated_at": unix time}, after each batch."""


def input_key(job_id: str) -> str:
    """Raw RGB uint8 bytes of the normalised upload, row-major (height, width, 3)."""
    return f"{KEY_PREFIX}input:{job_id}"


def result_key(job_id: str) -> str:
    """The safetensors bytes of a succeeded job; expires with the job's result TTL."""
    return f"{KEY_PREFIX}result:{job_id}"


def reconstruction_key(job_id: str) -> str:
    """The PNG of a `verify` job's reconstruction; expires with the job's result TTL."""
    return f"{KEY_PREFIX}reconstruction:{job_id}"


def cancel_key(job_id: str) -> str:
    """Set by a gateway to ask the worker running the job to stop it at the next step."""
    return f"{KEY_PREFIX}cancel:{job_id}"


CANCEL_CHANNEL = f"{KEY_PREFIX}cancels"
"""Pub/sub channel a gateway publishes a job id on right after setting its cancel_key: the
worker running the job hears it and stops at the next step without polling Redis per step
(workers still read the flags now and then, for a message missed while disconnected)."""


def tokenizer_key(digest: str) -> str:
    """A model's tokenizer (tokenizers JSON) by content hash, so gateways can count tokens."""
    return f"{KEY_PREFIX}tokenizer:{digest}"


def ended_key(job_id: str) -> str:
    """A one-element list the worker pushes when the job ends: waiters block on it (BLMOVE
    onto itself, so any number of them can) instead of polling the job's status."""
    return f"{KEY_PREFIX}ended:{job_id}"


ENDED_TTL_S = 600
"""How long a job's `ended` signal is kept: long enough for any waiter to see it."""


JOB_EVENTS_CHANNEL = f"{KEY_PREFIX}job-events"
"""Pub/sub channel that carries a job's id each time its progress or its end is written:
each gateway process holds one subscription and wakes that job's `Prefer: wait` and event
stream waiters, which then read the job (no waiter polls Redis)."""


def publish_job_event(pipe: Any, job_id: str) -> None:
    """Announce a change of the job on JOB_EVENTS_CHANNEL: queued in `pipe` (a redis client
    or pipeline) after the writes it announces, so that a woken reader sees them."""
    pipe.publish(JOB_EVENTS_CHANNEL, job_id)


def rate_key(owner: str, window: int) -> str:
    """Counter of the owner's submissions in one clock minute (`window`: unix minute)."""
    return f"{KEY_PREFIX}owner:{owner}:rate:{window}"


def idempotency_key(owner: str, key: str) -> str:
    """JSON {"payload_hash", "job_id"}: the one job an owner's Idempotency-Key names."""
    return f"{KEY_PREFIX}idem:{owner}:{key}"


def owner_jobs_key(owner: str) -> str:
    """Hash: job id -> GPU cost (`job_cost`) of each of the owner's jobs admitted and not
    yet seen ended; ended ones are pruned at the owner's next admission."""
    return f"{KEY_PREFIX}owner:{owner}:jobs"


def owner_gpu_ms_key(owner: str) -> str:
    """Hash: job id -> estimated GPU milliseconds (its cost at the model's measured cost/s)
    of each job in `owner_jobs_key`, pruned with it."""
    return f"{KEY_PREFIX}owner:{owner}:gpu-ms"


def owner_held_key(owner: str) -> str:
    """Sorted set: job id -> unix time after which the job's bytes are surely gone."""
    return f"{KEY_PREFIX}owner:{owner}:held"


def owner_held_bytes_key(owner: str) -> str:
    """Hash: job id -> bytes the job holds in Redis (its input, then its result)."""
    return f"{KEY_PREFIX}owner:{owner}:held:bytes"


def owner_held_total_key(owner: str) -> str:
    """The sum of `owner_held_bytes_key`'s values: what the per-key byte budget compares."""
    return f"{KEY_PREFIX}owner:{owner}:held:total"


ADMITTING_KEY = KEY_PREFIX + "admitting"
"""Sorted set: job id -> unix time it was admitted, until the transaction that enqueues it
removes it; counted in the queue depth, so that concurrent admissions cannot overfill."""


def fair_rounds_key(queue: str) -> str:
    """Sorted set: queued job id -> its round; the queue list is kept sorted by round."""
    return f"{KEY_PREFIX}fair:{queue}:rounds"


def fair_owners_key(queue: str) -> str:
    """Hash: owner -> the round of the owner's last job queued."""
    return f"{KEY_PREFIX}fair:{queue}:owners"


JOB_METRICS_KEY = KEY_PREFIX + "metrics:jobs"
"""Hash: `ended:<status>` counters, and per histogram `<name>:in:<bound>` (observations
in that bucket alone, `+Inf` for those above the last bound) and `<name>:sum`, written by
workers as jobs end; gateways sum the buckets into Prometheus' cumulative ones at scrape
time, so a job's end costs one increment per histogram, not one per bucket."""


GPU_SECONDS_KEY = KEY_PREFIX + "metrics:gpu_seconds"
"""Hash: owner label (job_metrics.owner_label) -> seconds of model calls its jobs' rows
took, counted by workers after each engine call; gateways export it as a counter."""


def model_job_metrics_key(model: str) -> str:
    """JOB_METRICS_KEY's fields counted for one model's jobs alone (gateways export them
    labelled by model, for known models only)."""
    return f"{JOB_METRICS_KEY}:{model}"

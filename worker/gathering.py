"""Steps 1 and 2 of a batch: the job RQ dequeued, and the queued jobs that can join it.

RQ dequeues the oldest job as usual (into its intermediate queue), so the oldest job is
always in the next batch: no job starves behind a stream of compatible ones. Then the
head of the queue is scanned for jobs that can share its UNet calls (same resolution,
steps, scheduler config and guidance mode; prompts may differ), waiting up to
`max_batch_wait_ms` for more while the queue is not empty, and those are claimed
atomically, up to the batch size and, while several owners wait, each owner's fair share
of it (fair_share.FairShare.apportion).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING

from redis import Redis

from ddim_inversion.contract import JobPayload
from ddim_inversion.errors import InvalidParameter
from worker import payloads, rq_adapter
from worker.engine.types import batch_key
from worker.fair_share import FairShare, owner_of
from worker.job_state import Running
from worker.rq_adapter import Job, Queue

if TYPE_CHECKING:
    from worker.models import LoadedModel

SCAN_FACTOR = 4
"""How far along the queue to look for compatible jobs, in multiples of the batch size."""

IDLE_POLL_S = 0.002
"""Pause between two scans of the queue while waiting for batch-mates."""


def head_of(job: Job) -> Running:
    """Step 1: the dequeued job with its payload; a job the service did not queue is
    disarmed (before RQ's start and failure paths see it: they would resolve its
    callbacks) and will fail at once."""
    head = Running(job=job)
    try:
        head.payload = payloads.trusted_payload(job)
    except payloads.JobFailed as exc:
        rq_adapter.disarm(job)
        head.error = (exc.code, exc.message)
    return head


def key_of(payload: JobPayload | None, model: LoadedModel) -> str | None:
    """What jobs must share to run in one batch; None for a job that runs alone."""
    if payload is None:
        return None
    try:
        return batch_key(payload.params, model)
    except (InvalidParameter, ValueError):
        return None


def gather(
    connection: Redis,
    queue: Queue,
    head: Running,
    model: LoadedModel,
    max_batch_size: int,
    max_wait_s: float,
    share: FairShare,
) -> list[Running]:
    """Step 2: compatible queued jobs claimed to run with `head`, each owner's rows within
    its fair share (`share.apportion`) of the owners waiting, waiting at most `max_wait_s`
    for them."""
    key = key_of(head.payload, model)
    if key is None or max_batch_size <= 1:
        return []
    extra: list[Running] = []
    deadline = time.monotonic() + max_wait_s
    owners: dict[str, str | None] = {}  # every queued job seen: its owner, None if unreadable
    compatible: dict[str, JobPayload] = {}
    while len(extra) + 1 < max_batch_size:
        ids = rq_adapter.queued_ids(connection, queue, max_batch_size * SCAN_FACTOR)
        for job in rq_adapter.fetch_jobs(connection, [i for i in ids if i not in owners]):
            try:
                payload = payloads.trusted_payload(job)
            except payloads.JobFailed:
                owners[job.id] = None
                continue
            owners[job.id] = owner_of(payload)
            if key_of(payload, model) == key:
                compatible[job.id] = payload
        wanted = pick(ids, owners, compatible, [head, *extra], share, max_batch_size)
        if wanted:
            claimed = rq_adapter.claim(connection, queue, wanted)
            # Read again once claimed: the hash as it is now that no one else can take it.
            for job in rq_adapter.fetch_jobs(connection, claimed):
                extra.append(Running(job=job, payload=compatible[job.id]))
        if len(extra) + 1 >= max_batch_size or time.monotonic() >= deadline:
            break
        if not ids:
            # An empty queue means an idle service: waiting would only add latency. Under
            # load the queue is never empty, and the wait collects a fuller batch.
            break
        time.sleep(min(IDLE_POLL_S, max(0.0, deadline - time.monotonic())))
    return extra


def pick(
    ids: list[str],
    owners: dict[str, str | None],
    compatible: dict[str, JobPayload],
    batch: list[Running],
    share: FairShare,
    max_batch_size: int,
) -> list[str]:
    """Of the queued `ids`, in queue order, the compatible jobs that fit in the batch and
    in their owner's share."""
    waiting = [o for o in (owners.get(i) for i in ids) if o is not None]
    taken = Counter(owner_of(item.payload) for item in batch)
    seats = share.apportion(owner_of(batch[0].payload), [*waiting, *taken], max_batch_size)
    wanted: list[str] = []
    for job_id in ids:
        owner = owners.get(job_id)
        if job_id not in compatible or owner is None or taken[owner] >= seats[owner]:
            continue
        wanted.append(job_id)
        taken[owner] += 1
        if len(batch) + len(wanted) >= max_batch_size:
            break
    return wanted

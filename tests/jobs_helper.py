"""Queue jobs as a gateway does, through the gateway's own enqueue, for worker tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from redis import Redis

from ddim_inversion import imaging
from ddim_inversion.keys import queue_name_for
from ddim_inversion.params import InversionParams
from service import jobs
from service.settings import GatewaySettings
from worker import rq_adapter
from worker.rq_adapter import Queue

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


TINY_QUEUE = queue_name_for("tiny")
"""The queue the test workers (serving `tiny`) drain."""


def queue_for(connection: Redis) -> Queue:
    return rq_adapter.open_queue(connection, TINY_QUEUE)


def enqueue(
    connection: Redis,
    image: str | Path = "chelsea.png",
    timeout: int = 600,
    retries: int = 0,
    owner: str = "",
    **params: Any,
) -> str:
    """Queue one job of `owner` (a key's hash; '': anonymous), the image normalised as the
    gateway does; its id."""
    parsed = InversionParams(**({"prompt": "a photo"} | params))
    size = parsed.resolution or (64, 64)
    rgb = imaging.normalize((SAMPLES / image).read_bytes(), size, parsed.resize_mode)
    settings = GatewaySettings(
        redis_url="redis://unused.invalid",
        job_timeout_s=timeout,
        result_ttl_s=3600,
        failure_ttl_s=3600,
        max_retries=retries,
    )
    job = jobs.enqueue(
        connection, queue_for(connection), settings, parsed, np.ascontiguousarray(rgb), owner=owner
    )
    return job.id


def solo_latents(model: Any, image: str, **params: Any) -> Any:
    """The engine's one-at-a-time result for the same inputs: the reference for batching."""
    from worker.engine.dispatch import invert
    from worker.engine.types import InversionRequest

    parsed = InversionParams(**({"prompt": "a photo"} | params))
    size = parsed.resolution or (64, 64)
    array = imaging.normalize((SAMPLES / image).read_bytes(), size, parsed.resize_mode)
    (result,) = invert(model, [InversionRequest(array, parsed)])
    return result.latents

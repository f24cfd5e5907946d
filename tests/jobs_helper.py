"""Queue jobs exactly as a gateway does (normalised RGB beside an RQ job), for worker tests."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from ddim_inversion import imaging
from ddim_inversion.contract import JOB_FUNCTION, META_OWNER, JobPayload
from ddim_inversion.keys import QUEUE_NAME, input_key
from ddim_inversion.params import InversionParams

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def queue_for(connection: Redis) -> Queue:
    return Queue(QUEUE_NAME, connection=connection, serializer=JSONSerializer)


def enqueue(
    connection: Redis, image: str | Path = "chelsea.png", timeout: int = 600, **params: Any
) -> str:
    parsed = InversionParams(**({"prompt": "a photo"} | params))
    size = parsed.resolution or (64, 64)
    array = imaging.normalize((SAMPLES / image).read_bytes(), size, parsed.resize_mode)
    job_id = str(uuid.uuid4())
    connection.set(input_key(job_id), np.ascontiguousarray(array).tobytes())
    payload = JobPayload(params=parsed, image_width=size[0], image_height=size[1])
    queue_for(connection).enqueue(
        JOB_FUNCTION,
        kwargs={"payload": payload.model_dump(mode="json")},
        job_id=job_id,
        job_timeout=timeout,
        result_ttl=3600,
        failure_ttl=3600,
        meta={META_OWNER: ""},
    )
    return job_id


def solo_latents(model: Any, image: str, **params: Any) -> Any:
    """The engine's one-at-a-time result for the same inputs: the reference for batching."""
    from worker.engine import InversionRequest, invert

    parsed = InversionParams(**({"prompt": "a photo"} | params))
    size = parsed.resolution or (64, 64)
    array = imaging.normalize((SAMPLES / image).read_bytes(), size, parsed.resize_mode)
    (result,) = invert(model, [InversionRequest(array, parsed)])
    return result.latents

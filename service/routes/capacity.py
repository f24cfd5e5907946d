"""GET /v1/capacity: what the worker pool can take now.

Behind the API key like every /v1 route: a client reads it before submitting (the models
served, how long a job would wait), and it tells about every tenant's load, which is no
business of an anonymous caller. Probes and dashboards have /readyz and /metrics.
"""

from __future__ import annotations

from service import workers
from service.deps import QueueDep, RedisDep, SettingsDep
from service.routes.v1 import v1_router
from service.schemas import Capacity

router = v1_router("/v1/capacity", "capacity")


@router.get("", response_model=Capacity, summary="The live workers, their models and the queue")
def get_capacity(redis: RedisDep, queue: QueueDep, settings: SettingsDep) -> Capacity:
    """Always 200 while Redis answers: no worker alive is a capacity of zero, and a job
    submitted then waits in the queue until one starts."""
    return workers.capacity(redis, queue, settings.worker_stale_s)

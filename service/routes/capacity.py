"""GET /v1/capacity: what the worker pool can take now (what it serves: models.py).

Behind the API key like every /v1 route: a client reads it before submitting (the models
served, how long a job would wait), and it tells about every tenant's load, which is no
business of an anonymous caller. Probes and dashboards have /readyz and /metrics.
"""

from __future__ import annotations

from service import pool
from service.deps import RedisDep, SettingsDep
from service.routes.v1 import v1_router
from service.schemas import Capacity

router = v1_router("/v1/capacity", "capacity")


@router.get("", response_model=Capacity, summary="The live workers, their models and the queues")
def get_capacity(redis: RedisDep, settings: SettingsDep) -> Capacity:
    """Always 200 while Redis answers: no worker alive is a capacity of zero, and a job
    submitted then waits in its model's queue until one starts (`by_model[].ready`)."""
    return pool.capacity(redis, settings)

"""GET /v1/models: the models jobs may name, from the workers' announcements.

Behind the API key like every /v1 route (it tells about every tenant's load).
"""

from __future__ import annotations

from service import pool
from service.deps import RedisDep, SettingsDep
from service.routes.v1 import v1_router
from service.schemas import Models

router = v1_router("/v1/models", "models")


@router.get("", response_model=Models, summary="The models jobs may name")
def get_models(redis: RedisDep, settings: SettingsDep) -> Models:
    """Every model a worker has announced (and the gateway's default): its family, native
    resolution, scheduler config and token limit, its live workers, queue and recent
    images/s. A known model without a live worker stays listed (`ready: false`): its jobs
    queue until one starts."""
    return pool.models(redis, settings)

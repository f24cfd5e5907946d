"""Schemathesis against the gateway's own OpenAPI schema, in process (fakeredis, no auth).

Every operation gets generated requests (valid and not); the answers must not be 5xx, must
use a status the schema lists, and must conform to the schema's response bodies.
"""

from __future__ import annotations

import time

import fakeredis
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from ddim_inversion.keys import WORKERS_KEY
from service.app import create_app
from service.settings import GatewaySettings
from tests.service.helpers import worker_record_of

REDIS = fakeredis.FakeRedis()
SETTINGS = GatewaySettings(
    redis_url="redis://unused.invalid:6379/0",
    auth_disabled=True,
    max_queued_per_key=10**6,
    rate_limit_per_minute=10**6,
)
APP = create_app(SETTINGS, redis=REDIS)

schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


def _fresh_worker() -> None:
    """A live worker, so that submissions are validated against a model's config in full."""
    record = worker_record_of()
    record = record.model_copy(update={"heartbeat_at": time.time()})
    REDIS.hset(WORKERS_KEY, record.name, record.model_dump_json())


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    _fresh_worker()
    case.call_and_validate(
        checks=[not_a_server_error, status_code_conformance, response_schema_conformance]
    )

"""Schemathesis against a real gateway process: its own OpenAPI document, fuzzed.

One private redis-server and one gateway process with an API key. Schemathesis reads the
gateway's OpenAPI document and generates requests for every operation (the documented
examples, then boundary and negative values of each parameter and body field, then random
ones), with a fixed seed and a bounded number of examples, so runs are repeatable and
short. Every answer must not be a 5xx and must conform to the document: a documented
status code, its content type, its headers and its body's schema. Once with the key, and
once without any: then every `/v1` operation answers a documented 401 problem.

No worker runs: a worker's record in Redis (an SD 1.5 model, refreshed before each case)
makes the gateway check submissions against that model in full, and the jobs it accepts
just queue.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from ddim_inversion.keys import WORKERS_KEY
from service.app import create_app
from service.settings import GatewaySettings
from tests.conftest import Processes, RedisServer, subprocess_env
from tests.service.helpers import SERVED_MODEL, worker_record_of

pytestmark = pytest.mark.e2e

KEY = "schemathesis-key"
AUTH = {"Authorization": f"Bearer {KEY}"}

FUZZ = settings(
    # Per operation and phase; with the coverage phase's own cases about 1500 requests
    # in all, a few seconds per run of 11 operations.
    max_examples=20,
    derandomize=True,  # a fixed seed: the same requests on every run
    deadline=None,
    suppress_health_check=list(HealthCheck),
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    # A request the schema refuses must get a 4xx. (Not its converse, a request the schema
    # admits must succeed: the body's image is bytes no schema can say are an image, and
    # the cross-field rules, like `eta` for `ddpm` only, are checked by the contract.)
    negative_data_rejection,
    # A method the path does not serve gets 405, whose Allow lists those it does.
    unsupported_method,
    allow_header_conformance,
]


@dataclass
class Gateway:
    url: str
    redis: redis.Redis


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    server = RedisServer(tmp_path_factory.mktemp("schema-redis"))
    server.start()
    # The gateway never loads a model: the model folder stays empty.
    env = subprocess_env(server.url, tmp_path_factory.mktemp("no-models"))
    procs = Processes(env, tmp_path_factory.mktemp("schema-logs"))
    try:
        url = procs.gateway(
            INVERSION_AUTH_DISABLED="false",
            INVERSION_API_KEY_HASHES=hashlib.sha256(KEY.encode()).hexdigest(),
            INVERSION_DEFAULT_MODEL=SERVED_MODEL,
            # Every accepted submission queues: no per-key limit may turn them into 429s.
            INVERSION_MAX_QUEUED_PER_KEY="1000000",
            INVERSION_RATE_LIMIT_PER_MINUTE="1000000",
            # A generated `Prefer: wait=N` holds the answer at most this long.
            INVERSION_MAX_PREFER_WAIT_S="1",
        )
        connection = redis.Redis.from_url(server.url)
        yield Gateway(url, connection)
        connection.close()
    finally:
        procs.stop_all()
        server.stop()


# The document the gateway serves, built from the same code at import (Schemathesis
# collects one test per operation before any fixture runs); the first test checks that
# the process serves this very document.
DOCUMENT = create_app(
    GatewaySettings(redis_url="redis://unused.invalid:6379/0", api_key_hashes=("0" * 64,))
).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_the_gateway_serves_the_document_fuzzed_here(gateway: Gateway) -> None:
    assert httpx.get(gateway.url + "/openapi.json").json() == DOCUMENT


def _fresh_worker(connection: redis.Redis) -> None:
    record = worker_record_of().model_copy(update={"heartbeat_at": time.time()})
    connection.hset(WORKERS_KEY, record.name, record.model_dump_json())


@schema.parametrize()
@FUZZ
def test_with_a_key_every_answer_conforms(case: schemathesis.Case, gateway: Gateway) -> None:
    _fresh_worker(gateway.redis)
    case.call_and_validate(base_url=gateway.url, headers=AUTH, checks=CHECKS)


@schema.parametrize()
@FUZZ
def test_without_a_key_every_v1_answer_is_a_401(case: schemathesis.Case, gateway: Gateway) -> None:
    response = case.call_and_validate(base_url=gateway.url, checks=CHECKS)
    if case.path.startswith("/v1/"):
        assert response.status_code == 401, response.text

"""Schemathesis against a real gateway process: its own OpenAPI document, fuzzed.

One private redis-server and one gateway process with an API key. Schemathesis reads the
gateway's OpenAPI document and generates requests for every operation (the documented
examples, then boundary and negative values of each parameter and body field, then random
ones), with a fixed seed and a bounded number of examples, so runs are repeatable and
short. Every answer must not be a 5xx and must conform to the document: a documented
status code, its content type, its headers and its body's schema. Once with the key, and
once without any: then every `/v1` operation answers a documented 401 problem. And once
against a gateway whose Redis is gone: every route that reads it answers a documented 503
problem, never a 500.

No worker runs: a worker's record in Redis (an SD 1.5 model, refreshed before each case)
makes the gateway check submissions against that model in full, and the jobs it accepts
just queue. So that the job routes answer more than 404, jobs in each state (queued,
running, succeeded with a reconstruction, failed, canceled) are written as a worker writes
them, and a generated job id is replaced by one of theirs in most cases.
"""

from __future__ import annotations

import base64
import hashlib
import io
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from ddim_inversion.errors import ErrorCode
from ddim_inversion.keys import WORKERS_KEY, queue_name_for
from service.app import create_app
from service.settings import GatewaySettings
from tests.conftest import Processes, RedisServer, subprocess_env
from tests.service.helpers import SERVED_MODEL, worker_record_of
from tests.worker_writes import WorkerWrites

pytestmark = pytest.mark.e2e


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


KEY = "schemathesis-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT_S = 30
"""A request that hangs fails its case instead of the whole run's pytest timeout."""
PNG = _png()
PNG_DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()

FUZZ = settings(
    # Per operation and phase; the coverage phase adds its own cases (each parameter's and
    # body field's boundaries and wrong types in turn): some 800 requests with the key.
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
    jobs: dict[str, str] = field(default_factory=dict)
    """A job id in each state, by the state's name."""

    def submit(self, **fields: object) -> str:
        body = {"image": PNG_DATA_URL, "prompt": "a cat", **fields}
        answer = httpx.post(self.url + "/v1/inversions", json=body, headers=AUTH)
        assert answer.status_code == 202, answer.text
        return str(answer.json()["id"])


def _processes(tmp_path_factory: pytest.TempPathFactory, server: RedisServer) -> Processes:
    # The gateway never loads a model: the model folder stays empty.
    env = subprocess_env(server.url, tmp_path_factory.mktemp("no-models"))
    return Processes(env, tmp_path_factory.mktemp("schema-logs"))


def _start_gateway(procs: Processes) -> str:
    return procs.gateway(
        INVERSION_AUTH_DISABLED="false",
        INVERSION_API_KEY_HASHES=hashlib.sha256(KEY.encode()).hexdigest(),
        INVERSION_DEFAULT_MODEL=SERVED_MODEL,
        # Every accepted submission queues: no per-key limit may turn them into 429s.
        INVERSION_MAX_QUEUED_PER_KEY="1000000",
        INVERSION_RATE_LIMIT_PER_MINUTE="1000000",
        # A generated `Prefer: wait=N` holds the answer at most this long, and so does an
        # event stream of a job that has not ended, should a case reach one.
        INVERSION_MAX_PREFER_WAIT_S="1",
        INVERSION_MAX_STREAM_S="2",
    )


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    server = RedisServer(tmp_path_factory.mktemp("schema-redis"))
    server.start()
    procs = _processes(tmp_path_factory, server)
    try:
        url = _start_gateway(procs)
        connection = redis.Redis.from_url(server.url)
        gateway = Gateway(url, connection)
        _fresh_worker(connection)
        _write_jobs(gateway)
        yield gateway
        connection.close()
    finally:
        procs.stop_all()
        server.stop()


@pytest.fixture(scope="module")
def gateway_without_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway started on a Redis that then stopped."""
    server = RedisServer(tmp_path_factory.mktemp("gone-redis"))
    server.start()
    procs = _processes(tmp_path_factory, server)
    try:
        url = _start_gateway(procs)
        server.stop()
        yield url
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
# Without the coverage phase (each field's boundary and wrong values in turn, some 500
# requests for POST alone): for the runs whose answers do not depend on the body.
schema_without_coverage = schemathesis.openapi.from_dict(
    DOCUMENT, config=SchemathesisConfig.from_dict({"phases": {"coverage": {"enabled": False}}})
)


def test_the_gateway_serves_the_document_fuzzed_here(gateway: Gateway) -> None:
    assert httpx.get(gateway.url + "/openapi.json").json() == DOCUMENT


def _fresh_worker(connection: redis.Redis) -> None:
    record = worker_record_of().model_copy(update={"heartbeat_at": time.time()})
    connection.hset(WORKERS_KEY, record.name, record.model_dump_json())


def _write_jobs(gateway: Gateway) -> None:
    writes = WorkerWrites(gateway.redis, queue_name_for(SERVED_MODEL))
    jobs = gateway.jobs
    jobs.update({state: gateway.submit() for state in ("queued", "running", "failed")})
    jobs["succeeded"] = gateway.submit(verify=True)
    jobs["canceled"] = gateway.submit()
    writes.start(jobs["running"], step=3)
    writes.succeed(jobs["succeeded"], reconstruction_png=PNG)
    writes.fail(jobs["failed"], ErrorCode.INVALID_INPUT, "the prompt is empty")
    writes.cancel(jobs["canceled"])


def _use_a_real_job(case: schemathesis.Case, gateway: Gateway) -> None:
    """Replace a generated job id with a job's, most of the time (the choice is the id's
    hash: the same on every run). An event stream of a job not ended lasts its whole
    lifetime, so those routes get ended jobs only; DELETE gets a job of its own."""
    generated = (case.path_parameters or {}).get("job_id")
    if not isinstance(generated, str) or case.meta is None:
        return
    if case.meta.generation.mode is not GenerationMode.POSITIVE:
        return
    states = sorted(gateway.jobs)
    if case.path.endswith("/events"):
        states = ["canceled", "failed", "succeeded"]
    pick = zlib.crc32(generated.encode()) % (len(states) + 1)
    if pick == len(states):
        return  # the generated id: an unknown job
    if case.method == "DELETE":
        job_id = gateway.submit()
        if pick % 2:
            WorkerWrites(gateway.redis, queue_name_for(SERVED_MODEL)).fail(
                job_id, ErrorCode.INVALID_INPUT, "ended, to be deleted"
            )
    else:
        job_id = gateway.jobs[states[pick]]
    case.path_parameters["job_id"] = job_id


@schema.parametrize()
@FUZZ
def test_with_a_key_every_answer_conforms(case: schemathesis.Case, gateway: Gateway) -> None:
    _fresh_worker(gateway.redis)
    _use_a_real_job(case, gateway)
    case.call_and_validate(base_url=gateway.url, headers=AUTH, checks=CHECKS, timeout=TIMEOUT_S)


@schema_without_coverage.parametrize()
@FUZZ
def test_without_a_key_every_v1_answer_is_a_401(case: schemathesis.Case, gateway: Gateway) -> None:
    response = case.call_and_validate(base_url=gateway.url, checks=CHECKS, timeout=TIMEOUT_S)
    if case.path.startswith("/v1/"):
        assert response.status_code == 401, response.text


@schema_without_coverage.parametrize()
@settings(FUZZ, max_examples=5)
def test_without_redis_every_answer_is_documented_and_no_500(
    case: schemathesis.Case, gateway_without_redis: str
) -> None:
    # A 503 is the answer here: every check but the one that refuses any 5xx.
    checks = [check for check in CHECKS if check is not not_a_server_error]
    response = case.call_and_validate(
        base_url=gateway_without_redis, headers=AUTH, checks=checks, timeout=TIMEOUT_S
    )
    assert response.status_code != 500, response.text

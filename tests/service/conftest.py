"""Fixtures for the gateway's unit tests: a FakeRedis behind the app, no real Redis."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from rq import Queue
from rq.serializers import JSONSerializer

from ddim_inversion.contract import WorkerRecord
from ddim_inversion.keys import WORKERS_KEY, queue_name_for
from service.settings import GatewaySettings
from tests.gateway_app import UNUSED_REDIS_URL, gateway_app
from tests.service.helpers import SERVED_MODEL, worker_record_of
from tests.worker_writes import WorkerWrites

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


@pytest.fixture
def fake_server() -> fakeredis.FakeServer:
    """One fake Redis, shared by the app's blocking and asyncio clients and the test."""
    return fakeredis.FakeServer()


@pytest.fixture
def redis(fake_server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fake_server)


@pytest.fixture
def settings() -> GatewaySettings:
    return GatewaySettings(
        redis_url=UNUSED_REDIS_URL, auth_disabled=True, default_model=SERVED_MODEL
    )


@pytest.fixture
def make_client(
    redis: fakeredis.FakeRedis, fake_server: fakeredis.FakeServer
) -> Iterator[Callable[..., TestClient]]:
    """A client over a fresh app; keyword arguments override settings fields, and
    `connection` replaces the FakeRedis (the blocking client) the app is given.

    Auth is disabled unless a test passes `auth_disabled=False` (and `api_key_hashes`).
    """
    clients: list[TestClient] = []

    def make(connection: Any = None, **overrides: Any) -> TestClient:
        overrides = {"default_model": SERVED_MODEL, **overrides}
        app = gateway_app(fake_server, redis if connection is None else connection, **overrides)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture
def queue(redis: fakeredis.FakeRedis) -> Queue:
    """The queue of SERVED_MODEL's jobs."""
    return Queue(queue_name_for(SERVED_MODEL), connection=redis, serializer=JSONSerializer)


@pytest.fixture
def writes(redis: fakeredis.FakeRedis) -> WorkerWrites:
    """A worker's writes of a job's start, progress and end, on the app's Redis."""
    return WorkerWrites(redis, queue_name_for(SERVED_MODEL))


@pytest.fixture
def chelsea() -> bytes:
    return (SAMPLES / "chelsea.png").read_bytes()


@pytest.fixture
def small_png() -> bytes:
    """A 96x64 image: fast to decode, not square, so width and height cannot be swapped."""
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def live_worker(redis: fakeredis.FakeRedis) -> WorkerRecord:
    record = worker_record_of()
    redis.hset(WORKERS_KEY, record.name, record.model_dump_json())
    return record


@pytest.fixture
def worker_record() -> Callable[..., WorkerRecord]:
    """Build a WorkerRecord of an SD 1.5 model: name, age_s and ModelInfo overrides."""
    return worker_record_of


@pytest.fixture
def submit() -> Callable[..., Any]:
    """POST an image and form fields to /v1/inversions."""
    return _submit


def _submit(
    client: TestClient,
    image: bytes,
    prompt: str = "a cat",
    filename: str = "image.png",
    **fields: Any,
) -> Any:
    data = {"prompt": prompt, **{k: str(v) for k, v in fields.items()}}
    return client.post("/v1/inversions", data=data, files={"image": (filename, image)})

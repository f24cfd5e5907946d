"""Clients of an in-process gateway: the real app over a fake Redis, reached through
httpx's in-process transports, for the client's handling of answers no worker is needed
for (refusals, problems, a queued job canceled)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest
from fastapi.testclient import TestClient

from ddim_inversion_client import ClientSettings, InversionClient
from tests.gateway_app import gateway_app


@pytest.fixture
def fake_server() -> fakeredis.FakeServer:
    """The in-process gateways' Redis: this test's alone, so no worker ever takes a job."""
    return fakeredis.FakeServer()


@pytest.fixture
def in_process(fake_server: fakeredis.FakeServer) -> Iterator[Callable[..., InversionClient]]:
    """A client of a new in-process gateway (its lifespan run, as at a real start); keyword
    arguments override the gateway's settings, `api_key` is the client's."""
    opened: list[TestClient] = []

    def make(api_key: str | None = None, **overrides: Any) -> InversionClient:
        http = TestClient(gateway_app(fake_server, **overrides))
        http.__enter__()
        opened.append(http)
        settings = ClientSettings(url=str(http.base_url), api_key=api_key)  # type: ignore[arg-type]
        return InversionClient(settings=settings, http=http)

    yield make
    for http in opened:
        http.__exit__(None, None, None)

"""API keys, job ownership per key, per-key limits, CORS and the startup checks."""

from __future__ import annotations

import hashlib

import pytest
import redis as redis_lib
from fastapi.testclient import TestClient
from pydantic import ValidationError

from ddim_inversion.keys import owner_jobs_key, result_key
from service import limits
from service.app import create_app
from service.redis_conn import check_eviction_policy
from service.settings import GatewaySettings
from tests.service.helpers import PROBLEM, fetch_job

KEY_A, KEY_B = "key-of-alice", "key-of-bob"
HASH_A = hashlib.sha256(KEY_A.encode()).hexdigest()
HASH_B = hashlib.sha256(KEY_B.encode()).hexdigest()
UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_401(response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    assert response.json()["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


def post(client: TestClient, image: bytes, headers: dict[str, str] | None = None):
    return client.post(
        "/v1/inversions",
        data={"prompt": "a cat"},
        files={"image": ("image.png", image)},
        headers=headers or {},
    )


@pytest.fixture
def authed(make_client):
    """A client whose app accepts KEY_A and KEY_B (sends no key by itself)."""
    return make_client(auth_disabled=False, api_key_hashes=(HASH_A, HASH_B))


# -- 401 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, bearer("wrong"), {"X-API-Key": "wrong"}])
def test_every_job_route_needs_a_valid_key(authed, small_png, headers):
    assert_401(post(authed, small_png, headers))
    assert_401(authed.get(f"/v1/inversions/{UNKNOWN_ID}", headers=headers))
    assert_401(authed.get(f"/v1/inversions/{UNKNOWN_ID}/latents", headers=headers))
    assert_401(authed.delete(f"/v1/inversions/{UNKNOWN_ID}", headers=headers))


def test_401_comes_before_validation(authed):
    assert_401(authed.post("/v1/inversions", data={"nonsense": "1"}))
    assert_401(authed.get("/v1/inversions/not-a-uuid"))


def test_probes_and_docs_need_no_key(authed):
    assert authed.get("/healthz").status_code == 200
    assert authed.get("/readyz").status_code == 200
    assert authed.get("/docs").status_code == 200
    spec = authed.get("/openapi.json").json()
    assert "401" in spec["paths"]["/v1/inversions"]["post"]["responses"]
    assert spec["components"]["securitySchemes"]


METRICS_TOKEN = "scraper-token"


@pytest.mark.parametrize("token_hash", ["", hashlib.sha256(METRICS_TOKEN.encode()).hexdigest()])
def test_metrics_need_the_metrics_token_not_an_api_key(make_client, token_hash):
    # The queues and workers of every tenant: neither an anonymous caller nor a tenant's
    # key reads them, only the scraper's token (none opens /metrics while it is unset).
    client = make_client(
        auth_disabled=False, api_key_hashes=(HASH_A,), metrics_token_hash=token_hash
    )
    for headers in ({}, bearer(KEY_A), {"X-API-Key": KEY_A}, bearer("wrong")):
        assert_401(client.get("/metrics", headers=headers))
    scraped = client.get("/metrics", headers=bearer(METRICS_TOKEN))
    if token_hash:
        assert scraped.status_code == 200
        assert "inversion_queue_depth" in scraped.text
    else:
        assert_401(scraped)


@pytest.mark.parametrize("headers", [bearer(KEY_A), {"X-API-Key": KEY_A}])
def test_both_header_forms_are_accepted(authed, small_png, redis, headers):
    response = post(authed, small_png, headers)
    assert response.status_code == 202, response.text
    job = fetch_job(redis, response.json()["id"])
    assert job.meta["owner"] == HASH_A
    assert authed.get(f"/v1/inversions/{job.id}", headers=headers).status_code == 200


def test_a_job_is_visible_to_its_key_only(authed, small_png):
    job_id = post(authed, small_png, bearer(KEY_A)).json()["id"]
    for path in (f"/v1/inversions/{job_id}", f"/v1/inversions/{job_id}/latents"):
        response = authed.get(path, headers=bearer(KEY_B))
        assert response.status_code == 404 and response.json()["code"] == "not_found"
    assert authed.delete(f"/v1/inversions/{job_id}", headers=bearer(KEY_B)).status_code == 404
    assert authed.get(f"/v1/inversions/{job_id}", headers=bearer(KEY_A)).status_code == 200
    assert authed.get(f"/v1/inversions/{job_id}/latents", headers=bearer(KEY_A)).status_code == 409
    assert authed.delete(f"/v1/inversions/{job_id}", headers=bearer(KEY_A)).status_code == 202


def test_another_keys_result_is_404_without_its_bytes(authed, small_png, redis, writes):
    # The download reads the result beside the job hash, before the owner is checked.
    job_id = authed.post(
        "/v1/inversions",
        data={"prompt": "a cat", "verify": "true"},
        files={"image": ("image.png", small_png)},
        headers=bearer(KEY_A),
    ).json()["id"]
    writes.succeed(job_id, reconstruction_png=small_png)
    latents = redis.get(result_key(job_id))
    for path in (f"/v1/inversions/{job_id}/latents", f"/v1/inversions/{job_id}/reconstruction"):
        response = authed.get(path, headers=bearer(KEY_B))
        assert response.status_code == 404 and response.json()["code"] == "not_found"
        assert latents not in response.content and small_png not in response.content
    mine = authed.get(f"/v1/inversions/{job_id}/latents", headers=bearer(KEY_A))
    assert mine.status_code == 200 and mine.content == latents
    mine = authed.get(f"/v1/inversions/{job_id}/reconstruction", headers=bearer(KEY_A))
    assert mine.status_code == 200 and mine.content == small_png


def test_anonymous_owner_while_auth_is_disabled(client, small_png, redis):
    job_id = post(client, small_png).json()["id"]
    job = fetch_job(redis, job_id)
    assert job.meta["owner"] == ""


# -- settings and startup -------------------------------------------------------------------


def test_startup_refused_without_key_hashes(redis):
    app = create_app(GatewaySettings(redis_url="redis://unused.invalid:6379/0"), redis)
    with pytest.raises(RuntimeError, match="INVERSION_API_KEY_HASHES"), TestClient(app):
        pass


def test_key_hashes_and_origins_from_the_environment(monkeypatch):
    monkeypatch.setenv("INVERSION_API_KEY_HASHES", f" {HASH_A.upper()}, {HASH_B} ")
    monkeypatch.setenv("INVERSION_CORS_ORIGINS", "https://a.example,https://b.example")
    settings = GatewaySettings()
    assert settings.api_key_hashes == (HASH_A, HASH_B)
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    monkeypatch.setenv("INVERSION_API_KEY_HASHES", f'["{HASH_A}"]')
    assert GatewaySettings().api_key_hashes == (HASH_A,)


def test_a_key_instead_of_its_hash_is_refused():
    with pytest.raises(ValidationError, match="hex SHA-256"):
        GatewaySettings(api_key_hashes=("my-secret-key",))


def test_wildcard_origin_with_credentials_is_refused():
    with pytest.raises(ValidationError, match="credentials"):
        GatewaySettings(cors_origins=("*",), cors_allow_credentials=True)
    assert GatewaySettings(cors_origins=("*",)).cors_origins == ("*",)


class _FakeConfig:
    def __init__(self, reply=None, error: Exception | None = None) -> None:
        self.reply, self.error = reply, error

    def config_get(self, pattern: str):
        if self.error is not None:
            raise self.error
        return self.reply


def test_evicting_redis_is_refused():
    fake = _FakeConfig({b"maxmemory-policy": b"allkeys-lru"})
    with pytest.raises(RuntimeError, match=r"allkeys-lru.*evicted"):
        check_eviction_policy(fake)


def test_noeviction_unreadable_and_unreachable_redis_are_accepted():
    assert check_eviction_policy(_FakeConfig({"maxmemory-policy": "noeviction"})) == "noeviction"
    denied = _FakeConfig(error=redis_lib.exceptions.ResponseError("NOPERM config"))
    assert check_eviction_policy(denied) is None
    down = _FakeConfig(error=redis_lib.exceptions.ConnectionError("refused"))
    assert check_eviction_policy(down) is None


def test_startup_refused_on_an_evicting_redis():
    settings = GatewaySettings(auth_disabled=True)
    app = create_app(settings, _FakeConfig({"maxmemory-policy": "volatile-lru"}))
    with pytest.raises(RuntimeError, match="volatile-lru"), TestClient(app):
        pass


def test_gateway_starts_while_redis_is_down():
    settings = GatewaySettings(
        redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.2, auth_disabled=True
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.get("/healthz").status_code == 200
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["code"] == "service_unavailable"


# -- per-key limits -------------------------------------------------------------------------


def test_per_key_queued_limit(make_client, small_png, redis, writes):
    client = make_client(auth_disabled=False, api_key_hashes=(HASH_A, HASH_B), max_queued_per_key=2)
    first = post(client, small_png, bearer(KEY_A)).json()["id"]
    assert post(client, small_png, bearer(KEY_A)).status_code == 202
    response = post(client, small_png, bearer(KEY_A))
    assert response.status_code == 429
    assert response.json()["code"] == "rate_limited"
    assert int(response.headers["retry-after"]) > 0
    # Another key is not limited by A's jobs.
    assert post(client, small_png, bearer(KEY_B)).status_code == 202
    # A finished job frees its slot (pruned at the next submission).
    writes.succeed(first)
    assert post(client, small_png, bearer(KEY_A)).status_code == 202
    assert redis.hlen(owner_jobs_key(HASH_A)) == 2


def test_deleted_job_frees_its_slot(make_client, small_png):
    client = make_client(auth_disabled=False, api_key_hashes=(HASH_A,), max_queued_per_key=1)
    job_id = post(client, small_png, bearer(KEY_A)).json()["id"]
    assert post(client, small_png, bearer(KEY_A)).status_code == 429
    assert client.delete(f"/v1/inversions/{job_id}", headers=bearer(KEY_A)).status_code == 202
    assert post(client, small_png, bearer(KEY_A)).status_code == 202


def test_per_minute_rate_limit(make_client, small_png):
    client = make_client(
        auth_disabled=False, api_key_hashes=(HASH_A, HASH_B), rate_limit_per_minute=2
    )
    assert post(client, small_png, bearer(KEY_A)).status_code == 202
    assert post(client, small_png, bearer(KEY_A)).status_code == 202
    response = post(client, small_png, bearer(KEY_A))
    assert response.status_code == 429
    assert response.json()["code"] == "rate_limited"
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert post(client, small_png, bearer(KEY_B)).status_code == 202


def test_rate_window_retry_after_is_the_rest_of_the_minute(redis):
    settings = GatewaySettings(redis_url="redis://unused.invalid:6379/0", rate_limit_per_minute=1)
    limits.count_submission(redis, settings, "owner", now=600.0)
    with pytest.raises(limits.ProblemError) as caught:
        limits.count_submission(redis, settings, "owner", now=615.2)
    assert caught.value.status == 429
    assert caught.value.headers["Retry-After"] == "45"
    limits.count_submission(redis, settings, "owner", now=660.0)  # the next window starts afresh


# -- CORS -----------------------------------------------------------------------------------


def _preflight(client: TestClient, origin: str):
    return client.options(
        "/v1/inversions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )


def test_cors_is_off_by_default(client):
    response = _preflight(client, "https://app.example")
    assert "access-control-allow-origin" not in response.headers


def test_cors_for_a_configured_origin(make_client):
    client = make_client(cors_origins=("https://app.example",))
    response = _preflight(client, "https://app.example")
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    other = _preflight(client, "https://evil.example")
    assert other.headers.get("access-control-allow-origin") != "https://evil.example"
    simple = client.get("/healthz", headers={"Origin": "https://app.example"})
    assert simple.headers["access-control-allow-origin"] == "https://app.example"


def test_cors_lets_front_ends_use_the_protocol_headers(make_client):
    client = make_client(cors_origins=("https://app.example",))
    response = client.options(
        "/v1/inversions",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "idempotency-key, prefer, x-api-key",
        },
    )
    assert response.status_code == 200
    allowed = response.headers["access-control-allow-headers"].lower()
    assert {"idempotency-key", "prefer", "x-api-key"} <= {h.strip() for h in allowed.split(",")}
    simple = client.get("/healthz", headers={"Origin": "https://app.example"})
    exposed = simple.headers["access-control-expose-headers"].lower()
    assert "preference-applied" in exposed and "idempotent-replayed" in exposed

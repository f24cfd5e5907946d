"""Probes, capacity, metrics, the shape of every generic error, settings and import hygiene."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis as redis_lib
from redis.backoff import NoBackoff
from redis.retry import Retry

from ddim_inversion.job_metrics import histogram_field
from ddim_inversion.keys import JOB_METRICS_KEY, QUEUE_NAME, WORKERS_KEY
from service import jobs
from service.app import create_app
from service.settings import GatewaySettings, get_settings
from tests.conftest import EVENT_GUARD_S
from tests.service.helpers import PROBLEM, assert_problem

ROOT = Path(__file__).resolve().parents[2]


def redis_down() -> redis_lib.Redis:
    """A client of a Redis that is not there: every command fails at once."""
    return redis_lib.Redis(
        host="127.0.0.1",
        port=1,
        socket_timeout=0.2,
        socket_connect_timeout=0.2,
        retry=Retry(NoBackoff(), 0),
    )


def test_healthz_does_not_touch_redis(make_client):
    client = make_client(connection=redis_down())
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_without_workers_so_a_rollout_keeps_gateways_serving(
    client, redis, worker_record, small_png, submit
):
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ready"}
    stale = worker_record(age_s=120)
    redis.hset(WORKERS_KEY, stale.name, stale.model_dump_json())
    assert client.get("/readyz").json() == {"status": "ready"}
    # What a ready gateway serves meanwhile: submissions queue, reads answer.
    accepted = submit(client, small_png)
    assert accepted.status_code == 202, accepted.text
    assert client.get(accepted.headers["location"]).json()["status"] == "queued"


def serving(record, model: str):
    """The worker record of a worker that serves another model."""
    return record.model_copy(update={"model": record.model.model_copy(update={"name": model})})


def test_readyz_is_a_status_word_whatever_the_workers(client, redis, worker_record):
    # A caller without a key learns that the gateway serves, not the pool behind it (the
    # workers' names and models are /v1/capacity's, behind the key).
    for record in (
        worker_record("gpu-0", age_s=2.0),
        serving(worker_record("gpu-1", age_s=1.0), "sd-2-base"),
        worker_record("gone", age_s=120),
    ):
        redis.hset(WORKERS_KEY, record.name, record.model_dump_json())
    response = client.get("/readyz")
    assert (response.status_code, response.json()) == (200, {"status": "ready"})
    listed = [(w["name"], w["model"]) for w in client.get("/v1/capacity").json()["workers"]]
    assert listed == [("gpu-1", "sd-2-base"), ("gpu-0", "stable-diffusion-v1-5")]


def test_metrics(client, submit, small_png, live_worker):
    assert submit(client, small_png).status_code == 202
    client.get("/v1/inversions/not-a-uuid")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        "inversion_http_requests_total",
        "inversion_jobs_submitted_total 1.0",
        "inversion_queue_depth 1.0",
        'inversion_rq_registry_jobs{registry="finished"} 0.0',
        "inversion_live_workers 1.0",
    ):
        assert name in text, name
    assert 'route="/v1/inversions",status="202"' in text
    assert 'route="/v1/inversions/{job_id}",status="404"' in text


def test_job_histograms_are_cumulative_from_per_bucket_counts(client, redis):
    # What workers write as three jobs end: one bucket increment per observation.
    for seconds in (0.03, 0.3, 700.0):
        redis.hincrby(JOB_METRICS_KEY, histogram_field("queue_wait", seconds))
        redis.hincrbyfloat(JOB_METRICS_KEY, "queue_wait:sum", seconds)
    text = client.get("/metrics").text
    for line in (
        'inversion_job_queue_wait_seconds_bucket{le="0.05"} 1.0',
        'inversion_job_queue_wait_seconds_bucket{le="0.25"} 1.0',
        'inversion_job_queue_wait_seconds_bucket{le="0.5"} 2.0',
        'inversion_job_queue_wait_seconds_bucket{le="600"} 2.0',
        'inversion_job_queue_wait_seconds_bucket{le="+Inf"} 3.0',
        "inversion_job_queue_wait_seconds_count 3.0",
        "inversion_job_queue_wait_seconds_sum 700.33",
        'inversion_job_run_seconds_bucket{le="+Inf"} 0.0',
    ):
        assert line in text, line


def test_two_apps_have_separate_registries(make_client):
    first, second = make_client(), make_client()
    first.get("/healthz")
    assert second.get("/metrics").status_code == 200
    assert first.app.state.metrics.registry is not second.app.state.metrics.registry


def test_unknown_route_and_method(client):
    assert_problem(client.get("/v2/nothing"), 404, "not_found")
    response = client.put("/v1/inversions")
    assert response.status_code == 405
    assert response.headers["content-type"].startswith(PROBLEM)


def test_a_405_allows_every_method_of_the_path(client):
    """GET and DELETE of a job are two routes: Allow names both (Starlette's only the first)."""
    response = client.put("/v1/inversions/some-id")
    assert_problem(response, 405, "validation_error")
    assert response.headers["allow"] == "DELETE, GET"
    assert client.patch("/v1/inversions").headers["allow"] == "POST"


def test_redis_down_is_503_with_retry_after(make_client):
    client = make_client(connection=redis_down())
    for path in (
        "/readyz",
        "/v1/capacity",
        "/v1/inversions/" + "0" * 8 + "-0000-4000-8000-" + "0" * 12,
    ):
        response = client.get(path)
        assert_problem(response, 503, "service_unavailable")
        assert response.headers["retry-after"] == "5"


def test_unexpected_error_is_500_problem(client, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(jobs, "load_job", boom)
    body = assert_problem(client.get("/v1/inversions/x"), 500, "internal")
    assert "bug" not in body["detail"]


def test_openapi_documents_the_api(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert set(paths) >= {
        "/v1/inversions",
        "/v1/inversions/{job_id}",
        "/v1/inversions/{job_id}/latents",
        "/healthz",
        "/readyz",
        "/v1/capacity",
        "/metrics",
    }
    assert "202" in paths["/v1/inversions"]["post"]["responses"]
    assert "JobView" in spec["components"]["schemas"]
    assert spec["components"]["schemas"]["JobAccepted"]["examples"]
    assert client.get("/docs").status_code == 200


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("INVERSION_MAX_STEPS", "77")
    monkeypatch.setenv("INVERSION_REDIS_URL", "redis://elsewhere:6380/2")
    settings = GatewaySettings()
    assert settings.max_steps == 77
    assert settings.redis_url == "redis://elsewhere:6380/2"
    assert settings.queue_name == QUEUE_NAME
    get_settings.cache_clear()
    try:
        assert get_settings().max_steps == 77
        app = create_app()
        assert app.state.settings is get_settings()
        assert app.dependency_overrides == {}
    finally:
        get_settings.cache_clear()


def test_gateway_never_imports_the_gpu_stack():
    code = (
        "import sys, service.app, service.main;"
        "service.app.create_app();"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'diffusers', 'transformers', 'worker')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=EVENT_GUARD_S,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_trailing_slash_redirects_to_a_relative_path(client):
    answer = client.get(
        "/v1/capacity/?a=1", headers={"Host": "evil.example"}, follow_redirects=False
    )
    assert answer.status_code == 307 and answer.headers["location"] == "/v1/capacity?a=1"


def test_a_redirect_location_never_names_another_host():
    from service.redirects import _relative

    assert _relative(b"http://evil.example//x.example/a", "//x.example/a/") == b"/x.example/a"
    assert _relative(b"https://elsewhere.example/other", "/v1/capacity/") is None

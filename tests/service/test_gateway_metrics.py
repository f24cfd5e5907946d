"""The pool series of /metrics: per queue, per live worker and per failure code, from Redis.

The jobs, registries and worker records are written with RQ's own API and the contract's
keys, the way workers and RQ write them; the scrape is read back with prometheus_client's
own text parser.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

from prometheus_client.parser import text_string_to_metric_families
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from ddim_inversion.contract import JOB_FUNCTION, META_ERROR, WorkerRecord
from ddim_inversion.errors import ErrorCode
from ddim_inversion.keys import GPU_SECONDS_KEY, THROUGHPUT_KEY, WORKERS_KEY

MODEL = "stable-diffusion-v1-5"
"""The model of the fake workers' records (tests/service/conftest.py): `queue` is its."""


def scrape(client) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics by name and label set."""
    response = client.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def labelled(samples: dict, name: str) -> dict[frozenset, float]:
    return {labels: value for (n, labels), value in samples.items() if n == name}


def key(**labels: str) -> frozenset:
    return frozenset(labels.items())


def publish(redis, record: WorkerRecord, images_per_s: float) -> None:
    redis.hset(WORKERS_KEY, record.name, record.model_dump_json())
    redis.hset(
        THROUGHPUT_KEY,
        record.name,
        json.dumps({"images_per_s": images_per_s, "updated_at": time.time()}),
    )


def fail(redis, queue, code: ErrorCode, ended_at: datetime) -> Job:
    """A job failed by a worker: its error meta, RQ's `ended_at` and the failed registry."""
    job = Job.create(
        JOB_FUNCTION,
        connection=redis,
        serializer=JSONSerializer,
        failure_ttl=3600,
        origin=queue.name,
    )
    job.meta[META_ERROR] = {"code": code.value, "message": "x"}
    job.ended_at = ended_at.replace(tzinfo=None)  # RQ stores naive UTC
    job.set_status(JobStatus.FAILED, pipeline=None)
    job.save()
    queue.failed_job_registry.add(job, ttl=3600)
    return job


def lose(redis, queue) -> Job:
    """A job whose worker died: RQ's own cleanup of its expired execution fails it."""
    job = Job.create(
        JOB_FUNCTION,
        connection=redis,
        serializer=JSONSerializer,
        failure_ttl=3600,
        origin=queue.name,
    )
    job.save()
    with redis.pipeline() as pipe:
        job.set_status(JobStatus.STARTED, pipeline=pipe)
        Execution.create(job, 1, pipeline=pipe)
        pipe.execute()
    queue.started_job_registry.cleanup(timestamp=time.time() + 3600)
    return Job.fetch(job.id, connection=redis, serializer=JSONSerializer)


def test_queue_jobs_wait_and_worker_rates_come_from_redis(
    client, redis, queue, worker_record
) -> None:
    for _ in range(3):
        queue.enqueue(JOB_FUNCTION, "payload")
    started = queue.started_job_registry.key
    redis.zadd(started, {"a:1": time.time() + 60, "b:1": time.time() + 60})
    fast, slow = worker_record("gpu-fast"), worker_record("gpu-slow")
    gone = worker_record("gpu-gone", age_s=600)
    publish(redis, fast, 2.0)
    publish(redis, slow, 1.0)
    publish(redis, gone, 50.0)  # a killed worker's rate stays behind: not counted

    samples = scrape(client)

    name = queue.name
    assert labelled(samples, "inversion_queue_jobs") == {
        key(queue=name, model=MODEL, state="queued"): 3.0,
        key(queue=name, model=MODEL, state="running"): 2.0,
    }
    model = fast.model.name
    assert labelled(samples, "inversion_worker_images_per_second") == {
        key(worker="gpu-fast", model=model): 2.0,
        key(worker="gpu-slow", model=model): 1.0,
    }
    # A job submitted now is the 4th in line; the two live workers make 3 images/s.
    assert labelled(samples, "inversion_queue_estimated_wait_seconds") == {
        key(queue=name, model=MODEL): round(4 / 3.0, 3)
    }
    assert labelled(samples, "inversion_live_workers") == {key(): 2.0}


def test_no_estimate_without_a_measured_rate(client, redis, queue, live_worker) -> None:
    queue.enqueue(JOB_FUNCTION, "payload")
    samples = scrape(client)
    assert (
        labelled(samples, "inversion_queue_jobs")[
            key(queue=queue.name, model=MODEL, state="queued")
        ]
        == 1
    )
    assert labelled(samples, "inversion_queue_estimated_wait_seconds") == {}
    assert labelled(samples, "inversion_worker_images_per_second") == {}


def test_a_worker_that_left_leaves_no_series(client, redis, worker_record) -> None:
    record = worker_record("gpu-0")
    publish(redis, record, 3.0)
    assert labelled(scrape(client), "inversion_worker_images_per_second")
    redis.hdel(WORKERS_KEY, record.name)
    assert labelled(scrape(client), "inversion_worker_images_per_second") == {}


def test_failed_jobs_by_code_with_the_latest_failure_time(client, redis, queue) -> None:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    early, late = now - timedelta(minutes=10), now - timedelta(minutes=1)
    fail(redis, queue, ErrorCode.GPU_OUT_OF_MEMORY, early)
    oom = fail(redis, queue, ErrorCode.GPU_OUT_OF_MEMORY, late)
    fail(redis, queue, ErrorCode.TIMEOUT, early)
    lost = lose(redis, queue)
    # The code is the one a client reads in the job's status (one classification).
    status = client.get(f"/v1/inversions/{lost.id}").json()
    assert (status["status"], status["error"]["code"]) == ("failed", "worker_lost")

    samples = scrape(client)

    name = queue.name
    assert labelled(samples, "inversion_failed_jobs") == {
        key(queue=name, model=MODEL, code="gpu_out_of_memory"): 2.0,
        key(queue=name, model=MODEL, code="timeout"): 1.0,
        key(queue=name, model=MODEL, code="worker_lost"): 1.0,
    }
    times = labelled(samples, "inversion_last_failure_timestamp_seconds")
    assert times[key(queue=name, model=MODEL, code="gpu_out_of_memory")] == late.timestamp()
    assert times[key(queue=name, model=MODEL, code="timeout")] == early.timestamp()
    # Failed by RQ's cleanup, without ended_at: the time of its failure Result.
    created = lost.latest_result().created_at
    result_time = (created if created.tzinfo else created.replace(tzinfo=timezone.utc)).timestamp()
    assert times[key(queue=name, model=MODEL, code="worker_lost")] == result_time

    # A job that leaves the registry (TTL, DELETE) leaves the counts on the next scrape.
    queue.failed_job_registry.remove(oom)
    after = labelled(scrape(client), "inversion_failed_jobs")
    assert after[key(queue=name, model=MODEL, code="gpu_out_of_memory")] == 1.0


def test_gpu_seconds_per_key_come_from_the_workers_counter(client, redis) -> None:
    redis.hincrbyfloat(GPU_SECONDS_KEY, "0123456789ab", 2.5)
    redis.hincrbyfloat(GPU_SECONDS_KEY, "anonymous", 0.25)
    samples = labelled(scrape(client), "inversion_gpu_seconds_total")
    assert samples == {
        frozenset({("owner", "0123456789ab")}): 2.5,
        frozenset({("owner", "anonymous")}): 0.25,
    }

"""The batching worker, in-process against a real Redis, with the tiny model."""

from __future__ import annotations

import math
import time

import pytest
import torch
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from ddim_inversion import imaging
from ddim_inversion.contract import META_ERROR, META_OWNER, META_RESULT, JobPayload
from ddim_inversion.keys import (
    CANCEL_CHANNEL,
    cancel_key,
    input_key,
    reconstruction_key,
    result_key,
)
from ddim_inversion.params import InversionParams
from tests.conftest import EVENT_GUARD_S, wait_for
from tests.jobs_helper import SAMPLES, enqueue, queue_for, solo_latents
from tests.rounding import drift, size
from worker.engine.types import load_result


class UnetCalls:
    """Counts UNet forward calls and their batch sizes."""

    def __init__(self, unet) -> None:
        self.sizes: list[int] = []
        self.handle = unet.register_forward_pre_hook(self.hook)

    def hook(self, module, args) -> None:
        self.sizes.append(int(args[0].shape[0]))

    def close(self) -> None:
        self.handle.remove()


@pytest.fixture
def unet_calls(tiny_model):
    calls = UnetCalls(tiny_model.unet)
    yield calls
    calls.close()


def fetch(connection, job_id: str) -> Job:
    return Job.fetch(job_id, connection=connection, serializer=JSONSerializer)


def latents_of(connection, job_id: str) -> torch.Tensor:
    tensors, _ = load_result(connection.get(result_key(job_id)))
    return tensors["latents"]


@pytest.mark.parametrize(("jobs", "batch"), [(5, 2), (4, 4), (3, 8)])
def test_compatible_jobs_share_unet_calls_and_equal_solo_results(
    redis_client, tiny_model, make_worker, unet_calls, jobs, batch
):
    steps = 4
    images = ["chelsea.png", "coffee.png", "astronaut.png"]
    specs = [(images[i % 3], f"prompt number {i}") for i in range(jobs)]
    ids = [
        enqueue(redis_client, image, prompt=prompt, num_inference_steps=steps)
        for image, prompt in specs
    ]
    worker = make_worker(redis_client, tiny_model, batch)
    worker.work(burst=True)

    assert worker.batches_run == math.ceil(jobs / batch)
    assert len(unet_calls.sizes) == math.ceil(jobs / batch) * steps
    for job_id, (image, prompt) in zip(ids, specs, strict=True):
        job = fetch(redis_client, job_id)
        assert job.get_status() == JobStatus.FINISHED
        assert job.meta[META_RESULT]["prompt"] == prompt
        solo = solo_latents(tiny_model, image, prompt=prompt, num_inference_steps=steps)
        # A row in a batch and alone: float32 rounding of the batched kernels
        # (tests/rounding.py's drift: 4.8e-5 for 4 unguided steps of |z| <= 1).
        tolerance = drift(steps, 1.0, size(solo))
        assert (latents_of(redis_client, job_id) - solo).abs().max() <= tolerance
    # Each job went through RQ's own registries: rq info sees them as finished.
    assert set(queue_for(redis_client).finished_job_registry.get_job_ids()) == set(ids)


def test_incompatible_jobs_all_finish_oldest_first(
    redis_client, tiny_model, make_worker, unet_calls
):
    # a, c, e are compatible (4 steps); b and d are not (3 steps, and 128x64).
    a = enqueue(redis_client, prompt="a", num_inference_steps=4)
    b = enqueue(redis_client, prompt="b", num_inference_steps=3)
    c = enqueue(redis_client, prompt="c", num_inference_steps=4)
    d = enqueue(redis_client, prompt="d", num_inference_steps=4, resolution="128x64")
    e = enqueue(redis_client, prompt="e", num_inference_steps=4)
    worker = make_worker(redis_client, tiny_model, 8)
    worker.work(burst=True)

    jobs = {name: fetch(redis_client, i) for name, i in zip("abcde", [a, b, c, d, e], strict=True)}
    assert all(job.get_status() == JobStatus.FINISHED for job in jobs.values())
    # Batches: [a, c, e] (the oldest with its compatible jobs), then [b], then [d].
    assert unet_calls.sizes == [3] * 4 + [1] * 3 + [1] * 4
    started = sorted(jobs, key=lambda n: jobs[n].started_at)
    assert started.index("b") < started.index("d")
    assert latents_of(redis_client, d).shape == (1, 4, 8, 16)


def test_job_canceled_mid_batch_stops_alone(redis_client, tiny_model, make_worker):
    steps = 6
    ids = [enqueue(redis_client, prompt=f"p{i}", num_inference_steps=steps) for i in range(3)]
    victim = ids[1]
    worker = make_worker(redis_client, tiny_model, 4)
    calls: list[int] = []

    def cancel_at_step_three(module, args) -> None:
        calls.append(int(args[0].shape[0]))
        if len(calls) == 3:
            redis_client.set(cancel_key(victim), "1")

    handle = tiny_model.unet.register_forward_pre_hook(cancel_at_step_three)
    try:
        worker.work(burst=True)
    finally:
        handle.remove()
    assert calls == [3, 3, 3, 2, 2, 2]
    canceled = fetch(redis_client, victim)
    assert canceled.get_status() == JobStatus.CANCELED
    assert canceled.meta[META_ERROR]["code"] == "canceled"
    assert redis_client.get(result_key(victim)) is None
    for job_id in (ids[0], ids[2]):
        assert fetch(redis_client, job_id).get_status() == JobStatus.FINISHED
        solo = solo_latents(
            tiny_model, "chelsea.png", prompt=f"p{ids.index(job_id)}", num_inference_steps=steps
        )
        # float32 rounding of the batched kernels (tests/rounding.py).
        tolerance = drift(steps, 1.0, size(solo))
        assert (latents_of(redis_client, job_id) - solo).abs().max() <= tolerance


def test_published_cancel_stops_the_job_at_the_next_step_without_polling(
    redis_client, tiny_model, make_worker
):
    steps = 6
    ids = [enqueue(redis_client, prompt=f"p{i}", num_inference_steps=steps) for i in range(2)]
    victim = ids[0]
    # The flags are never read from Redis during this batch: only the message can stop it.
    worker = make_worker(redis_client, tiny_model, 4, cancel_check_interval_s=5)
    calls: list[int] = []

    def cancel_at_step_three(module, args) -> None:
        calls.append(int(args[0].shape[0]))
        if len(calls) == 3:
            redis_client.set(cancel_key(victim), "1")
            redis_client.publish(CANCEL_CHANNEL, victim)
            wait_for(
                lambda: victim in worker.cancels.requested,
                EVENT_GUARD_S,
                "the pub/sub thread to deliver the cancel",
            )

    handle = tiny_model.unet.register_forward_pre_hook(cancel_at_step_three)
    try:
        worker.work(burst=True)
    finally:
        handle.remove()
    assert calls == [2, 2, 2, 1, 1, 1]
    assert fetch(redis_client, victim).get_status() == JobStatus.CANCELED
    assert fetch(redis_client, ids[1]).get_status() == JobStatus.FINISHED
    assert not worker.cancels.requested  # forgotten once the job ended


def test_out_of_memory_batch_is_split_and_retried(redis_client, tiny_model, make_worker):
    ids = [enqueue(redis_client, prompt=f"p{i}", num_inference_steps=3) for i in range(4)]
    worker = make_worker(redis_client, tiny_model, 4)
    sizes: list[int] = []

    def oom_above_two(module, args) -> None:
        sizes.append(int(args[0].shape[0]))
        if args[0].shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = tiny_model.unet.register_forward_pre_hook(oom_above_two)
    try:
        worker.work(burst=True)
    finally:
        handle.remove()
    assert sizes == [4, 2, 2, 2, 2, 2, 2]
    for i, job_id in enumerate(ids):
        assert fetch(redis_client, job_id).get_status() == JobStatus.FINISHED
        solo = solo_latents(tiny_model, "chelsea.png", prompt=f"p{i}", num_inference_steps=3)
        # float32 rounding of the batched kernels (tests/rounding.py).
        tolerance = drift(3, 1.0, size(solo))
        assert (latents_of(redis_client, job_id) - solo).abs().max() <= tolerance


def test_job_that_cannot_fit_alone_fails_with_its_code(redis_client, tiny_model, make_worker):
    big = enqueue(redis_client, prompt="big", num_inference_steps=3, resolution=128)
    small = enqueue(redis_client, prompt="small", num_inference_steps=3)
    worker = make_worker(redis_client, tiny_model, 4)

    def oom_on_large(module, args) -> None:
        if args[0].shape[-1] > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = tiny_model.unet.register_forward_pre_hook(oom_on_large)
    try:
        worker.work(burst=True)
    finally:
        handle.remove()
    failed = fetch(redis_client, big)
    assert failed.get_status() == JobStatus.FAILED
    assert failed.meta[META_ERROR]["code"] == "gpu_out_of_memory"
    assert fetch(redis_client, small).get_status() == JobStatus.FINISHED


class Clock:
    """worker.running's clock, which a test moves forward: a job's deadline passes at the
    step the test chooses, on a fast machine as on a slow one, without sleeping."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    from worker import running

    moved = Clock()
    monkeypatch.setattr(running, "time", moved)
    return moved


def test_job_timeout_fails_with_timeout_code(redis_client, tiny_model, make_worker, clock):
    slow = enqueue(redis_client, prompt="slow", num_inference_steps=5, timeout=60)
    fast = enqueue(redis_client, prompt="fast", num_inference_steps=5, timeout=600)
    worker = make_worker(redis_client, tiny_model, 4)

    def past_the_slow_deadline(module, args) -> None:
        clock.ahead = 61.0  # from the first step on: past 60 s, far from 600 s

    handle = tiny_model.unet.register_forward_pre_hook(past_the_slow_deadline)
    try:
        worker.work(burst=True)
    finally:
        handle.remove()
    timed_out = fetch(redis_client, slow)
    assert timed_out.get_status() == JobStatus.FAILED
    assert timed_out.meta[META_ERROR]["code"] == "timeout"
    assert fetch(redis_client, fast).get_status() == JobStatus.FINISHED


def test_timeout_during_verify_fails_timeout_and_stores_nothing(
    redis_client, tiny_model, make_worker, clock
):
    steps, timeout = 2, 600
    job_id = enqueue(
        redis_client, prompt="slow verify", num_inference_steps=steps, verify=True, timeout=timeout
    )
    worker = make_worker(redis_client, tiny_model, 1)
    calls: list[int] = []

    def slow_verify(module, args) -> None:
        calls.append(1)
        if len(calls) == steps + 1:  # verify's first sampling step outlasts the job's timeout
            clock.ahead = timeout + 1.0

    handle = tiny_model.unet.register_forward_pre_hook(slow_verify)
    try:
        worker.work(burst=True)
    finally:
        handle.remove()
    timed_out = fetch(redis_client, job_id)
    assert timed_out.get_status() == JobStatus.FAILED
    assert timed_out.meta[META_ERROR]["code"] == "timeout"
    assert len(calls) == steps + 1, "stopped inside verify, at the check after its deadline"
    assert redis_client.get(result_key(job_id)) is None
    assert redis_client.get(reconstruction_key(job_id)) is None


def test_a_job_queued_before_an_upgrade_still_runs(redis_client, tiny_model, make_worker):
    # As every earlier gateway recorded it: the function by this name, never imported.
    params = InversionParams(prompt="an old job", num_inference_steps=3)
    rgb = imaging.normalize((SAMPLES / "chelsea.png").read_bytes(), (64, 64))
    payload = JobPayload(params=params, image_width=64, image_height=64)
    job = queue_for(redis_client).enqueue_call(
        "worker.jobs.run_inversion",
        kwargs={"payload": payload.model_dump(mode="json")},
        meta={META_OWNER: ""},
    )
    redis_client.set(input_key(job.id), rgb.tobytes())
    make_worker(redis_client, tiny_model, 4).work(burst=True)

    assert fetch(redis_client, job.id).get_status() == JobStatus.FINISHED
    solo = solo_latents(tiny_model, "chelsea.png", prompt="an old job", num_inference_steps=3)
    # The worker's run and this one: float32 rounding (tests/rounding.py).
    tolerance = drift(3, 1.0, size(solo))
    assert (latents_of(redis_client, job.id) - solo).abs().max() <= tolerance

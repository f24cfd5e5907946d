"""The speed a worker records after each batch, which gateways estimate run times from."""

from __future__ import annotations

import json

import pytest

from ddim_inversion.estimates import job_cost
from ddim_inversion.keys import THROUGHPUT_KEY
from ddim_inversion.params import InversionParams
from tests.jobs_helper import enqueue
from worker.engine.types import resolution_of
from worker.liveness import Liveness


def test_the_record_carries_the_cost_per_second_of_the_jobs_run(
    redis_client, tiny_model, make_worker, monkeypatch
):
    # A worker removes its record as it quits (a burst run here): keep it to read it.
    monkeypatch.setattr(Liveness, "forget", lambda self: None)
    steps = 3
    for i in range(3):
        enqueue(redis_client, prompt=f"prompt {i}", num_inference_steps=steps)
    worker = make_worker(redis_client, tiny_model, 2)
    worker.work(burst=True)
    assert worker.batches_run == 2
    record = json.loads(redis_client.hget(THROUGHPUT_KEY, worker.name))
    params = InversionParams(prompt="a photo", num_inference_steps=steps)
    cost = job_cost(params, tiny_model.info(), resolution_of(params, tiny_model))
    # Every job costs `cost`: each batch's cost/s is `cost` x its images/s, and both averages
    # weigh the batches alike, so their ratio is `cost` up to a few roundings of doubles
    # (relative 1e-12 is thousands of ulps above them).
    assert record["cost_per_s"] / record["images_per_s"] == pytest.approx(cost, rel=1e-12)

"""Which model a job runs on, GET /v1/models, and the per-model queues (fakeredis)."""

from __future__ import annotations

import pytest
from rq import Queue
from rq.serializers import JSONSerializer

from ddim_inversion.contract import JobPayload
from ddim_inversion.keys import MODELS_KEY, WORKERS_KEY, queue_name_for
from service import pool
from service.errors import ProblemError


def announce(redis, record, live: bool = True) -> None:
    """What a worker writes: its model among the known ones, and (alive) its record."""
    redis.hset(MODELS_KEY, record.model.name, record.model.model_dump_json())
    if live:
        redis.hset(WORKERS_KEY, record.name, record.model_dump_json())


def serving(record, model: str, **info):
    return record.model_copy(
        update={"model": record.model.model_copy(update={"name": model, **info})}
    )


def queued_payload(redis, model: str) -> JobPayload:
    queue = Queue(queue_name_for(model), connection=redis, serializer=JSONSerializer)
    (job,) = queue.get_jobs()
    return JobPayload.model_validate(job.kwargs["payload"])


def test_choose_names_default_or_the_only_model(worker_record):
    known = {"a": worker_record().model, "b": worker_record().model}
    assert pool.choose("b", known, "")[0] == "b"
    assert pool.choose(None, known, "a")[0] == "a"
    # The configured default is queued for before any worker announced it: no record.
    assert pool.choose(None, {}, "a") == ("a", None)
    assert pool.choose("a", {}, "a") == ("a", None)
    assert pool.choose(None, {"a": known["a"]}, "")[0] == "a"


@pytest.mark.parametrize(
    ("requested", "known", "default"),
    [("c", ("a", "b"), ""), (None, ("a", "b"), ""), (None, (), ""), ("c", ("a",), "a")],
)
def test_an_unknown_or_missing_model_is_422_listing_the_served_ones(
    worker_record, requested, known, default
):
    records = {name: worker_record().model for name in known}
    with pytest.raises(ProblemError) as refused:
        pool.choose(requested, records, default)
    assert refused.value.status == 422 and refused.value.field == "model"
    assert all(name in refused.value.detail for name in known)


def test_each_model_s_jobs_go_to_its_queue_and_are_checked_against_its_record(
    make_client, redis, worker_record, submit, small_png
):
    client = make_client(default_model="")
    announce(redis, worker_record("gpu-a"))
    announce(redis, serving(worker_record("gpu-b"), "sd-small", native_resolution=(256, 256)))
    # Two models, no default: a job must name one.
    refused = submit(client, small_png)
    assert refused.status_code == 422 and refused.json()["field"] == "model"
    assert "sd-small" in refused.json()["detail"]

    assert submit(client, small_png, model="sd-small").status_code == 202
    assert submit(client, small_png, model="stable-diffusion-v1-5").status_code == 202
    small = queued_payload(redis, "sd-small")
    assert small.params.model == "sd-small"
    # Resized to ITS model's native size, not the other model's 512.
    assert (small.image_width, small.image_height) == (256, 256)
    assert queued_payload(redis, "stable-diffusion-v1-5").image_width == 512
    # Its resolution limit is its own: 2 x 256.
    too_big = submit(client, small_png, model="sd-small", resolution="1024")
    assert too_big.status_code == 422 and too_big.json()["field"] == "resolution"

    unknown = submit(client, small_png, model="never-served")
    assert unknown.status_code == 422 and unknown.json()["field"] == "model"
    assert "sd-small" in unknown.json()["detail"]


def test_a_known_model_without_a_live_worker_queues_and_its_status_says_so(
    make_client, redis, worker_record, submit, small_png
):
    client = make_client(default_model="")
    announce(redis, worker_record("gpu-a"))
    announce(redis, serving(worker_record("gpu-gone", age_s=600), "sd-down"), live=True)
    answer = submit(client, small_png, model="sd-down")
    assert answer.status_code == 202, answer.text
    status = client.get(answer.json()["urls"]["self"]).json()
    assert (status["status"], status["live_workers"], status["queue_position"]) == (
        "queued",
        0,
        0,
    )
    assert status["params"]["model"] == "sd-down"
    live = client.get(
        submit(client, small_png, model="stable-diffusion-v1-5").json()["urls"]["self"]
    )
    assert live.json()["live_workers"] == 1


def test_models_lists_every_known_model_with_its_workers_and_queue(
    make_client, redis, worker_record, submit, small_png
):
    client = make_client(default_model="")
    announce(redis, worker_record("gpu-a"))
    announce(redis, worker_record("gpu-a2"))
    announce(redis, serving(worker_record("gpu-b"), "sd2", text_hidden_size=1024), live=False)
    assert submit(client, small_png, model="sd2").status_code == 202

    body = client.get("/v1/models").json()

    assert body["default"] is None  # two models: a job must name one
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"sd2", "stable-diffusion-v1-5"}
    sd15, sd2 = by_name["stable-diffusion-v1-5"], by_name["sd2"]
    assert (sd15["ready"], sd15["live_workers"], sd15["queued"]) == (True, 2, 0)
    assert (sd2["ready"], sd2["live_workers"], sd2["queued"]) == (False, 0, 1)
    assert sd2["family"] == "sd2"
    assert sd15["native_resolution"] == [512, 512]
    assert sd15["tokenizer_max_length"] == 77
    assert sd15["scheduler_config"]["beta_schedule"] == "scaled_linear"
    capacity = {m["name"]: m["ready"] for m in client.get("/v1/capacity").json()["by_model"]}
    assert capacity == {"sd2": False, "stable-diffusion-v1-5": True}


def test_per_model_metrics_only_for_known_models(make_client, redis, worker_record):
    client = make_client(default_model="")
    announce(redis, worker_record("gpu-a"))
    redis.hincrby("inversion:metrics:jobs:stable-diffusion-v1-5", "ended:succeeded", 3)
    redis.hincrby("inversion:metrics:jobs:made-up", "ended:succeeded", 5)
    text = client.get("/metrics").text
    assert (
        'inversion_model_jobs_ended_total{model="stable-diffusion-v1-5",status="succeeded"} 3.0'
        in text
    )
    assert "made-up" not in text
    assert 'inversion_model_live_workers{model="stable-diffusion-v1-5"} 1.0' in text


def test_sdxl_parameters_are_for_sdxl_models_only(
    make_client, redis, worker_record, submit, small_png
):
    client = make_client(default_model="")
    announce(redis, worker_record("gpu-a"))
    announce(
        redis,
        serving(
            worker_record("gpu-xl"),
            "sdxl",
            family="sdxl",
            native_resolution=(1024, 1024),
            text_hidden_size=2048,
            text_pooled_size=1280,
        ),
    )
    sdxl_fields = {
        "prompt_2": "film grain",
        "original_size": "1024,1024",
        "target_size": "1024,768",
    }
    for name, value in sdxl_fields.items():
        refused = submit(client, small_png, model="stable-diffusion-v1-5", **{name: value})
        assert refused.status_code == 422, refused.text
        assert refused.json()["field"] == name
        assert "SDXL" in refused.json()["detail"] and "'sd'" in refused.json()["detail"]
    bad_pair = submit(client, small_png, model="sdxl", crops_coords_top_left="0,0,0")
    assert bad_pair.status_code == 422 and bad_pair.json()["field"] == "crops_coords_top_left"
    assert submit(client, small_png, model="sdxl", **sdxl_fields).status_code == 202
    queued = queued_payload(redis, "sdxl").params
    assert (queued.prompt_2, queued.original_size, queued.target_size) == (
        "film grain",
        (1024, 1024),
        (1024, 768),
    )
    assert {m["name"]: m["family"] for m in client.get("/v1/models").json()["models"]}["sdxl"] == (
        "sdxl"
    )

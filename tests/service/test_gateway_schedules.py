"""Schedules no step survives are refused at submit, and stored figures that JSON cannot
write (NaN, infinities) never fail an answer. Gateway app over a FakeRedis, a live SD 1.5
worker record (its scheduler config decides the schedule a job runs)."""

from __future__ import annotations

import json
import math

import pytest

from tests.service.helpers import assert_problem

ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        # Betas near 1: alpha-bar underflows to 0 at the 7th timestep; DDIM divides by it.
        (
            {"scheduler": {"beta_start": 0.9999999, "beta_end": 0.9999999}},
            "scheduler",
            "reaches 0 at timestep 6",
        ),
        (
            {"method": "edict", "scheduler": {"beta_start": 0.99, "beta_end": 0.995}},
            "scheduler",
            "reaches 0",
        ),
        # Betas that round to 0 in float32: alpha-bar stops decreasing.
        ({"scheduler": {"beta_start": 1e-9, "beta_end": 1e-9}}, "scheduler", "does not decrease"),
        # A clip above every log-SNR leaves DPM-Solver no timestep (IndexError in diffusers).
        (
            {"inverse_scheduler": "dpmsolver", "scheduler": {"lambda_min_clipped": 1e308}},
            "scheduler.lambda_min_clipped",
            "leaves timesteps 0..-1",
        ),
        # Zero terminal SNR ends at alpha-bar 0, which EDICT and an epsilon sampler divide by.
        ({"method": "edict", "scheduler": ZERO_SNR}, "scheduler", "method edict divides"),
        ({"verify": True, "scheduler": ZERO_SNR}, "scheduler", "verify divides"),
    ],
)
def test_a_schedule_no_step_survives_is_422(
    client, submit, small_png, live_worker, queue, fields, field, reason
):
    sent = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in fields.items()}
    answer = submit(client, small_png, num_inference_steps=10, **sent)
    body = assert_problem(answer, 422, "validation_error", field)
    assert reason in body["detail"], body["detail"]
    assert queue.count == 0


@pytest.mark.parametrize(
    "fields",
    [
        {"scheduler": ZERO_SNR},  # plain DDIM never divides by the last alpha-bar
        {"verify": True, "scheduler": ZERO_SNR | {"prediction_type": "v_prediction"}},
        {"inverse_scheduler": "dpmsolver", "scheduler": {"lambda_min_clipped": -5.1}},
        {"scheduler": {"beta_schedule": "squaredcos_cap_v2"}},
    ],
)
def test_schedules_that_run_are_accepted(client, submit, small_png, live_worker, fields):
    sent = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in fields.items()}
    answer = submit(client, small_png, num_inference_steps=10, **sent)
    assert answer.status_code == 202, answer.text


def test_stored_figures_json_cannot_write_are_answered_as_null(client, submit, small_png, writes):
    # An exact reconstruction has PSNR +inf; an overflowed one NaN. Stored as the worker
    # wrote them, they must not fail GET, Prefer: wait or an Idempotency-Key replay.
    headers = {"Idempotency-Key": "k", "Prefer": "wait=1"}
    first = client.post(
        "/v1/inversions",
        data={"prompt": "a cat", "verify": "true"},
        files={"image": ("a.png", small_png)},
        headers=headers,
    )
    job_id = first.json()["id"]
    writes.succeed(
        job_id,
        reconstruction_psnr=math.inf,
        reconstruction_latent_error=math.nan,
        refine_residuals=[1e-3, -math.inf],
    )
    for answer in (
        client.get(f"/v1/inversions/{job_id}"),
        client.post(
            "/v1/inversions",
            data={"prompt": "a cat", "verify": "true"},
            files={"image": ("a.png", small_png)},
            headers=headers,
        ),
    ):
        assert answer.status_code == 200, answer.text
        result = answer.json()["result"]
        assert result["reconstruction_psnr"] is None
        assert result["reconstruction_latent_error"] is None
        assert result["refine_residuals"] == [1e-3, None]

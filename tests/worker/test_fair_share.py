"""A batch's rows shared fairly between API keys, and the GPU seconds charged to each."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from ddim_inversion.job_metrics import owner_label
from ddim_inversion.keys import GPU_SECONDS_KEY
from service.metrics import JobMetricsCollector
from tests.jobs_helper import enqueue, queue_for
from worker import rq_adapter
from worker.fair_share import FairShare, GpuAccount, parse_weights, split_seconds
from worker.gathering import gather, head_of
from worker.settings import WorkerSettings

KEY_A = hashlib.sha256(b"key A").hexdigest()
KEY_B = hashlib.sha256(b"key B").hexdigest()
A, B = owner_label(KEY_A), owner_label(KEY_B)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def share_of(weights: str = "", half_life_s: float = 60.0, clock: Clock | None = None):
    return FairShare(parse_weights(weights), GpuAccount(half_life_s, clock or Clock()))


# -- the shares ------------------------------------------------------------------------------


def test_two_waiting_keys_get_equal_shares_whatever_their_backlog():
    share = share_of()
    assert share.apportion(A, [A] * 100 + [B], 8) == {A: 4, B: 4}


def test_one_waiting_key_fills_the_batch():
    assert share_of().apportion(A, [A] * 100, 8) == {A: 8}


def test_weights_change_the_split():
    assert share_of(f"{KEY_A}:3").apportion(A, [A, B], 8) == {A: 6, B: 2}
    assert share_of(f"{B}:3").apportion(A, [A, B], 8) == {A: 2, B: 6}  # label form


def test_left_over_rows_go_to_the_least_recent_gpu_time():
    clock = Clock()
    share = share_of(clock=clock)
    keys = [owner_label(hashlib.sha256(f"key {i}".encode()).hexdigest()) for i in range(4)]
    share.account.charge({keys[0]: 5.0, keys[1]: 1.0, keys[2]: 3.0})
    # 3 rows, 4 keys waiting: keys[0] heads the batch, the other two seats go to the keys
    # with the least recent GPU time (keys[3] never ran, keys[1] ran 1 s).
    assert share.apportion(keys[0], keys, 3) == {keys[0]: 1, keys[1]: 1, keys[2]: 0, keys[3]: 1}


def test_recent_gpu_time_halves_every_half_life():
    clock = Clock()
    account = GpuAccount(half_life_s=10.0, clock=clock)
    account.charge({A: 8.0})
    clock.now = 20.0
    assert account.recent(A) == pytest.approx(2.0, rel=1e-12)
    account.charge({A: 1.0})
    assert account.recent(A) == pytest.approx(3.0, rel=1e-12)
    clock.now = 1000.0  # 2**-98 of 3 s: forgotten at the next charge
    account.charge({B: 1.0})
    assert account.recent(A) < 1e-20 and A not in account._seconds


def test_seconds_are_split_by_unet_calls():
    assert split_seconds(8.0, [(A, 10), (A, 10), (B, 20), (B, 0)]) == {A: 4.0, B: 4.0}
    assert split_seconds(0.0, [(A, 1)]) == {}


@pytest.mark.parametrize("bad", ["abc", "abc:0", "abc:-1", "abc:x", ":2", "abc:nan"])
def test_bad_weights_are_refused_at_start(bad):
    with pytest.raises(ValidationError, match="keyhash:weight"):
        WorkerSettings(fair_share_weights=bad)


def test_weights_name_keys_by_their_short_hash():
    assert parse_weights(f" {KEY_A}:2.5 , {B}:1 ,") == {A: 2.5, B: 1.0}


# -- the gatherer, on a real Redis -----------------------------------------------------------


def gathered(redis_client, tiny_model, share: FairShare, max_batch_size: int = 8) -> list[str]:
    """The owners of a batch the gatherer forms: the queue's head, then its companions."""
    queue = queue_for(redis_client)
    first = rq_adapter.queued_ids(redis_client, queue, 1)
    (job,) = rq_adapter.fetch_jobs(redis_client, rq_adapter.claim(redis_client, queue, first))
    head = head_of(job)
    extra = gather(redis_client, queue, head, tiny_model, max_batch_size, 0.0, share)
    return [item.payload.owner for item in [head, *extra]]


@pytest.mark.parametrize(("weights", "a_rows"), [("", 4), (f"{KEY_A}:3", 6), (f"{KEY_B}:3", 2)])
def test_a_key_with_a_backlog_takes_its_share_and_the_other_key_joins(
    redis_client, tiny_model, weights, a_rows
):
    for _ in range(20):
        enqueue(redis_client, owner=KEY_A, num_inference_steps=2)
    enqueue(redis_client, owner=KEY_B, num_inference_steps=2)

    owners = gathered(redis_client, tiny_model, share_of(weights))

    assert owners.count(KEY_B) == 1
    assert owners.count(KEY_A) == a_rows
    assert owners[0] == KEY_A  # the queue's head always runs


def test_a_key_whose_job_cannot_join_still_holds_back_the_backlog(redis_client, tiny_model):
    """B's job has other steps: it runs next, behind a batch of A's share, not a full one."""
    for _ in range(20):
        enqueue(redis_client, owner=KEY_A, num_inference_steps=2)
    b_job = enqueue(redis_client, owner=KEY_B, num_inference_steps=3)

    owners = gathered(redis_client, tiny_model, share_of())

    assert owners == [KEY_A] * 4
    assert rq_adapter.queued_ids(redis_client, queue_for(redis_client), 1) == [b_job]


def test_alone_a_key_fills_the_batch(redis_client, tiny_model):
    for _ in range(20):
        enqueue(redis_client, owner=KEY_A, num_inference_steps=2)
    assert gathered(redis_client, tiny_model, share_of()) == [KEY_A] * 8


# -- the GPU seconds, through a worker -------------------------------------------------------


def test_a_batch_charges_each_key_its_rows_share_of_the_time(redis_client, tiny_model, make_worker):
    for _ in range(3):
        enqueue(redis_client, owner=KEY_A, num_inference_steps=2)
    enqueue(redis_client, owner=KEY_B, num_inference_steps=2)
    # Weighted 3:1 in a batch of 4, both keys' jobs run in one batch: A's 3 rows and B's 1.
    worker = make_worker(redis_client, tiny_model, 4, fair_share_weights=f"{A}:3")
    worker.share.account.clock = Clock()  # no decay between the charge and the reads
    worker.work(burst=True)

    assert worker.batches_run == 1
    charged = {k.decode(): float(v) for k, v in redis_client.hgetall(GPU_SECONDS_KEY).items()}
    assert set(charged) == {A, B}
    assert charged[B] > 0
    # Equal rows of equal UNet calls: exactly 3:1 but for float rounding of the split.
    assert charged[A] == pytest.approx(3 * charged[B], rel=1e-9)
    account = worker.share.account
    # Redis adds in long double: its sums agree with the worker's to double rounding.
    assert account.recent(A) == pytest.approx(charged[A], rel=1e-12)
    assert account.recent(B) == pytest.approx(charged[B], rel=1e-12)
    # What every gateway exports at scrape time, read from the same Redis.
    collector = JobMetricsCollector()
    collector.scrape = (redis_client, [])
    (family,) = [f for f in collector.collect() if f.name == "inversion_gpu_seconds"]
    exported = {s.labels["owner"]: s.value for s in family.samples if s.name.endswith("_total")}
    assert exported == charged

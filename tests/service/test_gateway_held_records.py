"""Every key a job creates in Redis is deleted with it or counted in its API key's held
bytes: the Idempotency-Key record (kept as long as a result), the end signal, and what a
canceled job keeps until it expires. Gateway app over a FakeRedis, worker writes real."""

from __future__ import annotations

import hashlib

from ddim_inversion.keys import owner_held_bytes_key, owner_held_total_key
from tests.service.helpers import assert_problem

KEY_A = "key-of-alice"
HASH_A = hashlib.sha256(KEY_A.encode()).hexdigest()
KEYS = {"auth_disabled": False, "api_key_hashes": (HASH_A,)}
AUTH = {"Authorization": f"Bearer {KEY_A}"}


def submit(client, image: bytes, idempotency_key: str):
    return client.post(
        "/v1/inversions",
        data={"prompt": "a cat"},
        files={"image": ("a.png", image)},
        headers=AUTH | {"Idempotency-Key": idempotency_key},
    )


def held(redis) -> int:
    return int(redis.get(owner_held_total_key(HASH_A)) or 0)


def test_deleting_a_job_deletes_every_key_it_made(make_client, small_png, redis, writes):
    client = make_client(**KEYS)
    before = set(redis.keys())
    key = "k" * 200
    job_id = submit(client, small_png, key).json()["id"]
    writes.succeed(job_id)
    assert held(redis) > 0
    assert client.delete(f"/v1/inversions/{job_id}", headers=AUTH).status_code == 204
    left = [
        name
        for name in set(redis.keys()) - before
        if job_id.encode() in name or key.encode() in name
    ]
    assert left == []
    assert held(redis) == 0
    assert redis.hgetall(owner_held_bytes_key(HASH_A)) == {}
    # The key is free again: the same key with another payload makes a new job.
    again = client.post(
        "/v1/inversions",
        data={"prompt": "a dog"},
        files={"image": ("a.png", small_png)},
        headers=AUTH | {"Idempotency-Key": key},
    )
    assert again.status_code == 202 and again.json()["id"] != job_id


def test_submit_and_cancel_cycles_are_bounded_by_the_byte_budget(make_client, small_png, redis):
    # One job's admission needs its worst-case bytes; each canceled job then keeps its
    # record, its signals and its Idempotency-Key record, a few KB, for a day. Counted,
    # they fill the budget after a few cycles; uncounted, the cycles would never end.
    probe = make_client(**KEYS)
    first = submit(probe, small_png, "probe").json()["id"]
    job_bytes = int(redis.hget(owner_held_bytes_key(HASH_A), first))
    probe.delete(f"/v1/inversions/{first}", headers=AUTH)  # canceled
    assert probe.delete(f"/v1/inversions/{first}", headers=AUTH).status_code == 204
    assert held(redis) == 0

    budget = job_bytes + 20_000
    client = make_client(**KEYS, max_held_bytes_per_key=budget, max_job_bytes=budget)
    answers, canceled = [], []
    for cycle in range(40):
        answer = submit(client, small_png, f"{cycle:03d}" + "k" * 197)
        answers.append(answer.status_code)
        if answer.status_code != 202:
            break
        canceled.append(answer.json()["id"])
        assert client.delete(f"/v1/inversions/{canceled[-1]}", headers=AUTH).status_code == 202
    assert answers[-1] == 429 and 2 <= len(canceled) < 40, answers
    assert_problem(answer, 429, "quota_exceeded")
    kept = {k.decode(): int(v) for k, v in redis.hgetall(owner_held_bytes_key(HASH_A)).items()}
    assert held(redis) == sum(kept.values())
    for cycle, job_id in enumerate(canceled):
        assert kept[job_id] > 0  # the canceled job's record and signals
        assert kept[f"idem:{cycle:03d}" + "k" * 197] > 200  # its Idempotency-Key record
    # Deleting the canceled jobs gives it all back.
    for job_id in canceled:
        assert client.delete(f"/v1/inversions/{job_id}", headers=AUTH).status_code == 204
    assert held(redis) == 0
    assert submit(client, small_png, "after").status_code == 202

"""The attacks of `bench/abuse.py`, one function each: key A attacks, key B works.

Each returns (key A's answers, what came of it) and calls `ctx.b.start()` when key B's
job of the row should be submitted. Nothing is asserted: they report what happens.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from rq import Callback, Queue
from rq.serializers import JSONSerializer

from bench import abuse_decoding
from bench.abuse_stack import (
    KEY_A,
    KEY_A_RACES,
    KEY_A_REPLAYS,
    KEY_A_TIMEOUT,
    KEY_B,
    METRICS_AUTH,
    PARKED_QUEUE,
    PNG,
    STRICT,
    TERMINAL,
    MemorySampler,
    Receiver,
    SocketTrap,
    Stack,
    codes,
    delete,
    key_hash,
    submit,
    view_of,
    wait_terminal,
)
from ddim_inversion.contract import JOB_FUNCTION
from ddim_inversion.keys import (
    input_key,
    owner_held_total_key,
    queue_name_for,
    rate_key,
    result_key,
)

TINY_QUEUE = queue_name_for("tiny")
"""The queue of the tiny model's jobs, which the workers here drain."""

LONG_STEPS = 900
"""A job that runs for seconds on the tiny model (from 1.5 ms a step on a free core);
under SD 1.5's scheduler limit of 999 steps."""


class KeyB:
    """Key B's one job per attack: submitted with a webhook, followed until it ends."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.job: str | None = None
        self.code: int | None = None
        self.summary: tuple[str, float | None] | None = None
        self.submit_ms: float | None = None

    def start(self) -> None:
        try:
            started = time.perf_counter()
            answer = submit(self.ctx.stack.main, KEY_B, webhook_url=self.ctx.receiver.url)
            self.submit_ms = (time.perf_counter() - started) * 1000
            self.code = answer.status_code
            self.job = answer.json().get("id") if answer.status_code == 202 else None
        except httpx.HTTPError as exc:
            self.code = 0
            print(f"  key B's submit failed: {exc}", file=sys.stderr)

    def finish(self, grace_s: float) -> tuple[str, float | None]:
        if self.summary is not None:
            return self.summary
        if self.code is None:
            self.start()
        if self.job is None:
            self.summary = (f"submit {self.code}", None)
            return self.summary
        view = wait_terminal(self.ctx.stack.main, KEY_B, self.job, grace_s)
        if view.get("status") not in TERMINAL:
            self.summary = (f"{view.get('status')} after {grace_s:g} s", None)
            return self.summary
        hook = None
        ended = datetime.fromisoformat(view["timings"]["finished_at"]).timestamp()
        deadline = time.monotonic() + grace_s
        while self.job not in self.ctx.receiver.arrivals and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.job in self.ctx.receiver.arrivals:
            hook = self.ctx.receiver.arrivals[self.job] - ended
        self.ctx.b_finished.append(self.job)
        self.summary = (f"{view['status']} in {view['timings']['run_s'] or 0:.1f} s", hook)
        return self.summary


@dataclass
class Ctx:
    args: argparse.Namespace
    stack: Stack
    receiver: Receiver
    sampler: MemorySampler
    slow: SocketTrap
    """Attack 5's slow receiver (its port is among the allowed webhook ports)."""
    b: KeyB | None = None
    window: tuple[float, float] | None = None
    """When to read key B's latencies, if not the attack's whole time."""
    b_finished: list[str] = field(default_factory=list)
    """Key B's jobs that succeeded, oldest first."""
    step_s: float | None = None
    """The worker's seconds per step, as `verify_cancel` measured them."""


def forget(ctx: Ctx, jobs: list[str]) -> int:
    """Take key A's jobs out of Redis directly (their DELETE may have failed): the next
    attacks must start from a clean service. How many needed it."""
    forced = 0
    for job in jobs:
        if ctx.stack.redis.exists(f"rq:job:{job}"):
            forced += 1
            for queue in (TINY_QUEUE, queue_name_for("tiny", PARKED_QUEUE)):
                ctx.stack.redis.lrem(f"rq:queue:{queue}", 0, job)
            ctx.stack.redis.delete(f"rq:job:{job}", input_key(job), result_key(job))
    return forced


# -- the attacks ---------------------------------------------------------------------------


def waiters_and_streams(ctx: Ctx) -> tuple[str, str]:
    """Point 4: Prefer: wait replays and SSE streams on one queued job, all at once."""
    args = ctx.args
    idem = f"abuse-wait-{uuid.uuid4()}"
    job = submit(ctx.stack.parked, KEY_A, {"Idempotency-Key": idem}).json()["id"]
    assert ctx.b is not None
    ctx.b.start()
    base, key = ctx.stack.main, {"X-API-Key": KEY_A}
    state: dict[str, Any] = {"waits": [], "streams": [], "over": [], "ended": 0, "opened": 0}

    async def wait() -> None:
        headers = key | {"Idempotency-Key": idem, "Prefer": "wait=60"}
        for _ in range(100):
            try:
                answer = await http.post(
                    "/v1/inversions",
                    data={"prompt": "a cat", "num_inference_steps": "3", "resolution": "64"},
                    files={"image": ("tiny.png", PNG, "image/png")},
                    headers=headers,
                )
            except httpx.TransportError:
                answer = None  # refused and closed while its body was still being sent
            # Past the key's bound of bodies in progress (a 429 or a closed connection):
            # try again, as a client would.
            if answer is not None and "request bodies" not in answer.text:
                break
            await asyncio.sleep(0.1)
        assert answer is not None
        state["waits"].append(answer.status_code)
        state["ended"] += answer.status_code == 200

    async def stream(record: str) -> None:
        async with http.stream("GET", f"/v1/inversions/{job}/events", headers=key) as answer:
            state[record].append(answer.status_code)
            async for line in answer.aiter_lines():
                if line == "event: end":
                    state["ended"] += 1
                elif line == "event: status" and record == "streams":
                    state["opened"] += 1

    async def open_waits() -> float:
        text = (await http.get("/metrics", headers=METRICS_AUTH)).text
        for line in text.splitlines():
            if line.startswith("inversion_open_waits "):
                return float(line.split()[1])
        return -1.0

    async def attack() -> None:
        nonlocal http
        limits = httpx.Limits(max_connections=args.waiters + args.streams + 50)
        async with httpx.AsyncClient(base_url=base, timeout=90, limits=limits) as http:
            tasks = [asyncio.create_task(wait()) for _ in range(args.waiters)]
            tasks += [asyncio.create_task(stream("streams")) for _ in range(args.streams)]
            target, deadline = args.waiters + args.streams, time.monotonic() + 60
            while (held := await open_waits()) < target and time.monotonic() < deadline:
                if held < 0 and state["opened"] == args.streams:
                    await asyncio.sleep(3)  # a gateway without the gauge: let waits settle
                    break
                await asyncio.sleep(0.2)
            state["held"] = "?" if held < 0 else f"{held:g}"
            start = time.time()
            await asyncio.sleep(args.window_s)
            ctx.window = (start, time.time())
            over = [asyncio.create_task(stream("over")) for _ in range(10)]
            await asyncio.wait(over, timeout=10)
            state["cancel"] = (await http.delete(f"/v1/inversions/{job}", headers=key)).status_code
            await asyncio.wait(tasks + over, timeout=20)
            for task in tasks + over:
                task.cancel()
            await asyncio.gather(*tasks, *over, return_exceptions=True)

    http: Any = None
    asyncio.run(attack())
    answers = (
        f"waits {codes(state['waits'])}; streams {codes(state['streams'])}; "
        f"over the cap {codes(state['over'])}; DELETE {state['cancel']}"
    )
    admitted = sum(code == 200 for code in state["streams"] + state["over"])
    admitted += len(state["waits"])
    outcome = f"{state['held']} held at once; ended by the cancel: {state['ended']} of {admitted}"
    return answers, outcome


def replays(ctx: Ctx) -> tuple[str, str]:
    """Point 4a: idempotent replays against a 5/min rate limit (strict gateway)."""
    assert ctx.b is not None
    ctx.b.start()
    headers = {"Idempotency-Key": f"abuse-replay-{uuid.uuid4()}"}
    answers = [submit(ctx.stack.strict, KEY_A_REPLAYS, headers).status_code for _ in range(31)]
    served = sum(code in (200, 202) for code in answers[1:])
    limit = STRICT["rate_limit_per_minute"]
    return codes(answers), f"{served} of 30 replays served under {limit}/min"


def races(ctx: Ctx) -> tuple[str, str]:
    """Point 8: 30 concurrent submits against a per-key limit of 3 queued (strict)."""
    assert ctx.b is not None
    ctx.b.start()
    with ThreadPoolExecutor(30) as pool:
        answers = list(
            pool.map(
                lambda _: submit(ctx.stack.strict, KEY_A_RACES, num_inference_steps=LONG_STEPS),
                range(30),
            )
        )
    accepted = [a.json()["id"] for a in answers if a.status_code == 202]
    for job in accepted:
        delete(ctx.stack.strict, KEY_A_RACES, job)
    limit = STRICT["max_queued_per_key"]
    return codes(a.status_code for a in answers), f"accepted {len(accepted)} (limit {limit})"


def fairness(ctx: Ctx) -> tuple[str, str]:
    """Point 3c: a backlog from key A, then one job of key B: when does B's start?"""
    args, main = ctx.args, ctx.stack.main
    answers = [submit(main, KEY_A, num_inference_steps=args.backlog_steps) for _ in range(20)]
    mine = [a.json()["id"] for a in answers if a.status_code == 202]
    assert ctx.b is not None
    ctx.b.start()
    ctx.b.finish(args.grace_s + 30)
    outcome = "B's job did not run"
    if ctx.b.job is not None:
        b_started = view_of(main, KEY_B, ctx.b.job)["timings"].get("started_at")
        before = 0
        for job in mine:
            started = view_of(main, KEY_A, job)["timings"].get("started_at")
            before += bool(started and b_started and started < b_started)
        outcome = f"B's job started after {before} of A's {len(mine)}"
    for job in mine:
        delete(main, KEY_A, job)
    return codes(a.status_code for a in answers), outcome


def verify_cancel(ctx: Ctx) -> tuple[str, str]:
    """Point 3a: DELETE while the job is in its verify phase (after its inversion's steps).

    Also measures the worker's time per step, which `verify_timeout` sizes its job from.
    """
    main, steps = ctx.stack.main, ctx.args.verify_steps
    assert ctx.b is not None
    ctx.b.start()
    job = submit(main, KEY_A, num_inference_steps=steps, verify=True).json()["id"]
    deadline, step, running_at = time.monotonic() + 60, 0, None
    while time.monotonic() < deadline:
        view = view_of(main, KEY_A, job)
        step = (view.get("progress") or {}).get("step", 0)
        if running_at is None and view.get("status") == "running":
            running_at = time.monotonic()
        if step > steps or view.get("status") in TERMINAL:
            break
        time.sleep(0.02)
    if running_at is not None and step > steps:
        ctx.step_s = (time.monotonic() - running_at) / step
    answer = delete(main, KEY_A, job)
    final = wait_terminal(main, KEY_A, job, 60).get("status")
    latents = httpx.get(f"{main}/v1/inversions/{job}/latents", headers={"X-API-Key": KEY_A})
    delete(main, KEY_A, job)
    outcome = f"DELETE at step {step}/{2 * steps}; ended {final}; latents {latents.status_code}"
    return f"DELETE {answer}", outcome


def verify_timeout(ctx: Ctx) -> tuple[str, str]:
    """Point 3a: a verify job whose inversion ends within its timeout (strict gateway: 2 s)
    and whose verify phase goes past it; sized from the step time `verify_cancel` saw."""
    assert ctx.b is not None
    ctx.b.start()
    limit = STRICT["job_timeout_s"]
    steps = max(10, min(999, int(0.6 * limit / ctx.step_s))) if ctx.step_s else 200
    answer = submit(ctx.stack.strict, KEY_A_TIMEOUT, num_inference_steps=steps, verify=True)
    view = wait_terminal(ctx.stack.strict, KEY_A_TIMEOUT, answer.json()["id"], 60)
    error = (view.get("error") or {}).get("code", "")
    run_s = (view.get("timings") or {}).get("run_s") or 0
    ended = " ".join(filter(None, (view.get("status"), error)))
    outcome = f"{steps} steps + verify: ended {ended} after {run_s:.1f} s"
    return codes([answer.status_code]), outcome + f" (limit {limit} s)"


def webhooks(ctx: Ctx) -> tuple[str, str]:
    """Point 5: a receiver that drips its answer, and a webhook to a private address."""
    slow, trap = ctx.slow, SocketTrap()
    main = ctx.stack.main
    try:
        first = submit(main, KEY_A, webhook_url=f"http://127.0.0.1:{slow.port}/hook")
        deadline = time.monotonic() + 30
        while not slow.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        private = submit(main, KEY_A, webhook_url=f"http://localhost:{trap.port}/internal")
        assert ctx.b is not None
        ctx.b.start()  # B's webhook comes after A's slow delivery started
        if private.status_code == 202:
            wait_terminal(main, KEY_A, private.json()["id"], 30)
        ctx.b.finish(ctx.args.slow_s + ctx.args.grace_s)
    finally:
        slow.close()
        trap.close()
    outcome = (
        f"slow receiver dripped {ctx.args.slow_s:g} s; localhost:{trap.port} "
        f"reached {len(trap.connections)}×"
    )
    return f"slow {first.status_code}; private {private.status_code}", outcome


def canceled_ttls(ctx: Ctx) -> tuple[str, str]:
    """Point 6: do a canceled job's keys expire?"""
    stack = ctx.stack
    assert ctx.b is not None
    ctx.b.start()
    queued = submit(stack.parked, KEY_A).json()["id"]
    running = submit(stack.main, KEY_A, num_inference_steps=LONG_STEPS).json()["id"]
    deadline = time.monotonic() + 30
    while view_of(stack.main, KEY_A, running).get("status") == "queued":
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    answers = [delete(stack.parked, KEY_A, queued), delete(stack.main, KEY_A, running)]
    wait_terminal(stack.main, KEY_A, running, 30)
    time.sleep(0.5)  # the worker's cancel is written after the job's end
    forever, total = [], 0
    for job in (queued, running):
        for name in stack.redis.scan_iter(match=f"*{job}*"):
            total += 1
            if stack.redis.ttl(name) == -1:
                forever.append(name.decode().replace(job, "<id>"))
    registries = sum(
        stack.redis.zscore(f"rq:canceled:{queue}", job) is not None
        for queue in (TINY_QUEUE, queue_name_for("tiny", PARKED_QUEUE))
        for job in (queued, running)
    )
    names = ", ".join(sorted(set(forever))) or "none"
    outcome = f"{len(forever)} of {total} keys never expire ({names}); "
    outcome += f"in a canceled registry: {registries}"
    return codes(answers), outcome


def forged_jobs(ctx: Ctx) -> tuple[str, str]:
    """Point 7: jobs written straight into Redis, naming code for the worker to run."""
    assert ctx.b is not None
    ctx.b.start()
    queue = Queue(TINY_QUEUE, connection=ctx.stack.redis, serializer=JSONSerializer)
    marker = f"ABUSE-FORGED-{uuid.uuid4().hex[:8]}"
    callback = queue.enqueue(
        JOB_FUNCTION,
        kwargs={"payload": {"bogus": marker}},
        job_id=f"forged-{marker}",
        on_failure=Callback("builtins.print"),
    )
    # A side effect that logging cannot fake (RQ's log line names the arguments).
    called_marker = ctx.stack.logs / f"{marker}-CALLED"
    function = queue.enqueue("os.mkdir", str(called_marker), job_id=f"forged-fn-{marker}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = [job.get_status(refresh=True) for job in (callback, function)]
        if all(s.value in ("finished", "failed", "canceled", "stopped") for s in states):
            break
        time.sleep(0.1)
    time.sleep(0.5)
    log = ctx.stack.worker_log()
    called = f"Job('forged-{marker}'" in log
    ran = called_marker.exists()
    states = [job.get_status(refresh=True).value for job in (callback, function)]
    outcome = f"on_failure callback called: {'yes' if called else 'no'}; "
    outcome += f"function called: {'yes' if ran else 'no'}; ended {'/'.join(states)}"
    return "written to Redis", outcome


def redis_fill(ctx: Ctx) -> tuple[str, str]:
    """Point 1: big resolutions from a tiny PNG, stored as RGB (parked queue: never run)."""
    stack, args = ctx.stack, ctx.args
    answers, mine = [], []
    for _ in range(args.fill_jobs):
        answer = submit(stack.parked, KEY_A, resolution=args.fill_resolution)
        answers.append(answer.status_code)
        if answer.status_code != 202:
            break
        mine.append(answer.json()["id"])
    assert ctx.b is not None
    ctx.b.start()
    finished = ctx.b_finished[0] if ctx.b_finished else None
    b_delete = delete(stack.main, KEY_B, finished) if finished else "-"
    deletes = [delete(stack.parked, KEY_A, job) for job in mine]
    after_mb = int(stack.redis.info("memory")["used_memory"]) / 2**20
    forget(ctx, mine)
    outcome = f"B: submit {ctx.b.code}, DELETE of a finished job {b_delete}; "
    outcome += f"A's DELETEs {codes(deletes)}, Redis {after_mb:.1f} MB after them"
    return codes(answers), outcome


def result_too_large(ctx: Ctx) -> tuple[str, str]:
    """Point 2: a result bigger than Redis takes in one value (`proto-max-bulk-len` 1 MB)."""
    stack, main = ctx.stack, ctx.stack.main
    stack.redis.config_set("proto-max-bulk-len", "1mb")
    try:
        lines_before = stack.worker_log().count("\n")
        answer = submit(
            main, KEY_A, num_inference_steps=300, resolution=128, return_trajectory=True
        )
        assert ctx.b is not None
        ctx.b.start()
        view = wait_terminal(main, KEY_A, answer.json()["id"], ctx.args.observe_s)
        grown = stack.worker_log().count("\n") - lines_before
        error = (view.get("error") or {}).get("code", "")
        ctx.b.finish(grace_s=3.0)  # B has waited all along: a jammed worker runs nothing
    finally:
        stack.redis.config_set("proto-max-bulk-len", "512mb")
    outcome = f"A's job {' '.join(filter(None, (view.get('status'), error)))} after "
    outcome += f"{ctx.args.observe_s:g} s; worker log +{grown} lines"
    return codes([answer.status_code]), outcome


def _post_json(base: str, key: str, text: str, headers: dict[str, str] | None = None) -> int:
    """POST a raw JSON body (escapes kept as sent); its status, 0 if the connection broke."""
    sent = {"X-API-Key": key, "Content-Type": "application/json", **(headers or {})}
    try:
        url = base + "/v1/inversions"
        return httpx.post(url, content=text.encode(), headers=sent, timeout=60).status_code
    except httpx.HTTPError:
        return 0


def _json_body(members: str) -> str:
    image = base64.b64encode(PNG).decode()
    return f'{{"image": "{image}", "num_inference_steps": 3, "resolution": 64, {members}}}'


FORGED = "2026-12-07 00:00:00 CRITICAL admin key compromised"


def hostile_text(ctx: Ctx) -> tuple[str, str]:
    """Issue 21.3: lone surrogates in each field and a field name that forges a log line;
    webhook URLs with CR/LF and a space (issue 21.7)."""
    main, hook = ctx.stack.main, f"http://127.0.0.1:{ctx.receiver.port}/hook"
    assert ctx.b is not None
    ctx.b.start()
    lone = "\\ud800"
    bodies = [
        f'"prompt": "{lone}"',
        f'"prompt": "a cat", "negative_prompt": "{lone}"',
        f'"prompt": "a cat", "scheduler": {{"{lone}": 1}}',
        f'"prompt": "a cat", "{lone}\\n{FORGED}": 1',
        f'"prompt": "a cat", "webhook_url": "{hook}/{lone}"',
    ]
    answers = [
        _post_json(main, KEY_A, _json_body(b), {"Idempotency-Key": uuid.uuid4().hex})
        for b in bodies
    ]
    # JSON escapes: the URL decodes to CR LF, a valid JSON string.
    for url in (f"{hook}/a\\r\\nX-Injected: 1", f"{hook}/a b"):
        body = _json_body(f'"prompt": "a", "webhook_url": "{url}"')
        answers.append(_post_json(main, KEY_A, body))
    logs = "\n".join(p.read_text(errors="replace") for p in ctx.stack.logs.glob("*.log"))
    forged = sum(line.startswith(FORGED) for line in logs.splitlines())
    return codes(answers), f"log lines starting with the forged text: {forged}"


def degenerate_schedules(ctx: Ctx) -> tuple[str, str]:
    """Issue 21.4: schedules no step survives, with verify and Prefer: wait."""
    main = ctx.stack.main
    assert ctx.b is not None
    ctx.b.start()
    cases = [
        {"scheduler": '{"beta_start": 0.9999999, "beta_end": 0.9999999}', "verify": True},
        {"inverse_scheduler": "dpmsolver", "scheduler": '{"lambda_min_clipped": 1e308}'},
        {"method": "edict", "scheduler": '{"beta_start": 0.99, "beta_end": 0.995}'},
    ]
    answers = [submit(main, KEY_A, {"Prefer": "wait=10"}, **case) for case in cases]
    accepted = [a.json()["id"] for a in answers if a.status_code in (200, 202)]
    ended = [wait_terminal(main, KEY_A, job, 30).get("status", "?") for job in accepted]
    forget(ctx, accepted)
    return codes(a.status_code for a in answers), f"jobs accepted and then: {ended or 'none'}"


def huge_list(ctx: Ctx) -> tuple[str, str]:
    """Issue 21.5: a JSON body whose trained_betas holds millions of entries."""
    main, redis_client = ctx.stack.main, ctx.stack.redis
    assert ctx.b is not None
    ctx.b.start()
    owner = key_hash(KEY_A)
    before = sum(int(redis_client.get(k) or 0) for k in redis_client.keys(rate_key(owner, "*")))
    betas = ", ".join(["0.01"] * ctx.args.list_entries)
    body = _json_body(f'"prompt": "a", "scheduler": {{"trained_betas": [{betas}]}}')
    started = time.perf_counter()
    answer = _post_json(main, KEY_A, body)
    took = time.perf_counter() - started
    after = sum(int(redis_client.get(k) or 0) for k in redis_client.keys(rate_key(owner, "*")))
    outcome = f"{len(body) / 2**20:.1f} MB, {ctx.args.list_entries} entries: answered in "
    return codes([answer]), outcome + f"{took:.2f} s; the key's rate counter +{after - before}"


def idempotency_cycles(ctx: Ctx) -> tuple[str, str]:
    """Issue 21.6: submit with a fresh 200-character Idempotency-Key, then DELETE."""
    stack, redis_client = ctx.stack, ctx.stack.redis
    assert ctx.b is not None
    ctx.b.start()
    owner = key_hash(KEY_A)
    used = int(redis_client.info("memory")["used_memory"])
    answers, jobs = [], []
    for _ in range(ctx.args.idem_cycles):
        key = uuid.uuid4().hex * 6 + uuid.uuid4().hex[:8]  # 200 characters
        answer = submit(stack.parked, KEY_A, {"Idempotency-Key": key})
        answers.append(answer.status_code)
        if answer.status_code != 202:
            continue
        jobs.append(answer.json()["id"])
        answers.append(delete(stack.parked, KEY_A, jobs[-1]))
    grown = int(redis_client.info("memory")["used_memory"]) - used
    held = int(redis_client.get(owner_held_total_key(owner)) or 0)
    records = sum(1 for _ in redis_client.scan_iter(match=f"*idem:{owner}:*"))
    deleted = [delete(stack.parked, KEY_A, job) for job in jobs]
    left = sum(1 for _ in redis_client.scan_iter(match=f"*idem:{owner}:*"))
    outcome = f"{len(jobs)} cycles: Redis +{grown / 1024:.0f} KB, key A's held bytes "
    outcome += f"{held / 1024:.0f} KB ({records} records); after DELETE of the canceled jobs "
    return codes(answers), outcome + f"{codes(deleted)}: {left} records left"


def idle(ctx: Ctx) -> tuple[str, str]:
    assert ctx.b is not None
    ctx.b.start()
    time.sleep(ctx.args.idle_s)
    return "-", "no attack: the reference"


ATTACKS: list[tuple[str, Callable[[Ctx], tuple[str, str]]]] = [
    ("idle", idle),
    ("4: waits + streams on one job", waiters_and_streams),
    ("4: idempotent replays vs 5/min", replays),
    ("8: 30 concurrent submits vs 3 queued", races),
    ("3: A's backlog of 20, then B", fairness),
    ("3: cancel during verify", verify_cancel),
    ("3: verify past the job timeout", verify_timeout),
    ("5: slow receiver, private target", webhooks),
    ("6: canceled jobs' TTLs", canceled_ttls),
    ("7: forged jobs in Redis", forged_jobs),
    ("1: big resolutions fill Redis", redis_fill),
    ("2: result over proto-max-bulk-len", result_too_large),
    ("21.2: 40 JPEGs of 300 scans at once", abuse_decoding.many_scan_jpegs),
    ("21.2: JPEG scans past 1 s of CPU", abuse_decoding.scans_past_the_cpu_limit),
    ("21.2: 10 palette PNGs of 40 Mpx", abuse_decoding.palette_pngs),
    ("21.2: 16-bit PNGs, float TIFFs of 36 Mpx", abuse_decoding.deep_greys),
    ("21.3: surrogates, forged log line, CR/LF URL", hostile_text),
    ("21.4: degenerate schedules", degenerate_schedules),
    ("21.5: millions of trained_betas", huge_list),
    ("21.6: Idempotency-Key + DELETE cycles", idempotency_cycles),
]

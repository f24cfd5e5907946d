"""One tenant against another: each attack of issue 11 by key A while key B works normally.

Starts a private Redis (small `maxmemory`, noeviction), gateways with two keys and one
tiny worker (bench/abuse_stack.py), then runs, in order: 200 `Prefer: wait` replays and
150 event streams on one job (and 10 streams over the per-key cap); idempotent replays
under a 5/min rate limit; 30 concurrent submits under a per-key limit of 3; a backlog of
20 jobs from A before one of B (fairness); a cancel during `verify` and a `verify` job
over its timeout; a slow webhook receiver and a webhook to a private address; canceled
jobs' TTLs; forged jobs written straight into Redis; big resolutions filling Redis; a
result over Redis's `proto-max-bulk-len`; issue 21's lone surrogates in every field and a
field name that forges a log line, webhook URLs with CR/LF or a space, degenerate
schedules (with verify and `Prefer: wait`), a JSON body of millions of `trained_betas`,
and submit + DELETE cycles with fresh 200-character Idempotency-Keys; images that are
costly to decode (bench/abuse_decoding.py: many-scan JPEGs, scans past the CPU limit,
huge palettes, 16-bit and float greys); then the edge's (bench/abuse_edge.py): held and
dripped request bodies, a 40 KB header arriving whole, what a caller without a key reads.
During each, key B GETs one of its jobs every 20 ms (from a process of its own) and
submits one job with a webhook (its submit's latency is in the job column).

Prints a markdown table: the attack, key A's answers, what came of it, key B's GET
p50/p95 during the attack against idle, B's job and webhook delay, Redis's peak used
memory, the worker's state. Nothing is asserted: the table reports what happened.
Bounded in count and time (about 3 minutes on 2 cores; `--quick` about half); loopback.

    python bench/abuse.py [--quick] [--env INVERSION_X=1 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.abuse_attacks import ATTACKS, Ctx, KeyB  # noqa: E402
from bench.abuse_edge import EDGE_ATTACKS  # noqa: E402
from bench.abuse_stack import (  # noqa: E402
    KEY_B,
    MemorySampler,
    Prober,
    Receiver,
    SocketTrap,
    start_stack,
    submit,
    wait_terminal,
)


@dataclass
class Row:
    attack: str
    answers: str
    outcome: str
    window: tuple[float, float]
    b_job: str = "-"
    b_hook_s: float | None = None
    redis_mb: float = 0.0
    workers: str = "-"


def run(ctx: Ctx, name: str, attack: Callable[[Ctx], tuple[str, str]]) -> Row:
    ctx.b, ctx.window = KeyB(ctx), None
    start = time.time()
    try:
        answers, outcome = attack(ctx)
    except Exception as exc:  # report it and go on: one attack must not hide the others
        answers, outcome = "error", f"{type(exc).__name__}: {exc}"[:160]
    end = time.time()
    row = Row(name, answers, outcome, ctx.window or (start, end))
    row.b_job, row.b_hook_s = ctx.b.finish(ctx.args.grace_s)
    if ctx.b.submit_ms is not None:
        row.b_job += f", submit {ctx.b.submit_ms:.0f} ms"
    row.redis_mb = ctx.sampler.peak_mb(start, time.time())
    row.workers = ctx.stack.workers()
    if ctx.stack.ensure_worker():
        row.workers += " (restarted)"
    print(f"- {name}: {time.time() - start:.1f} s", file=sys.stderr, flush=True)
    return row


def table(rows: list[Row], prober: Prober) -> str:
    idle_stats = prober.window(*rows[0].window)
    lines = [
        "| attack | key A's answers | outcome | B GET p50 / p95 ms (x idle p50) | "
        "B's job | B webhook s | Redis peak MB | worker |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        stats = prober.window(*row.window)
        if stats is None or idle_stats is None:
            latency = "-"
        else:
            p50, p95, bad = stats
            latency = f"{p50:.1f} / {p95:.1f} ({p50 / idle_stats[0]:.2f}x)"
            latency += f", {bad} not 200" if bad else ""
        hook = "-" if row.b_hook_s is None else f"{row.b_hook_s:.2f}"
        lines.append(
            f"| {row.attack} | {row.answers} | {row.outcome} | {latency} | {row.b_job} | "
            f"{hook} | {row.redis_mb:.1f} | {row.workers} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer connections, shorter")
    parser.add_argument(
        "--only", nargs="+", default=[], metavar="N", help="the attacks of these points only"
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="for every process"
    )
    args = parser.parse_args()
    quick = args.quick
    args.waiters, args.streams = (60, 40) if quick else (200, 150)
    args.window_s = 3.0 if quick else 5.0
    args.idle_s = 3.0
    args.grace_s = 15.0
    args.slow_s = 6.0 if quick else 12.0
    args.observe_s = 6.0 if quick else 10.0
    args.backlog_steps, args.verify_steps = 20, 200
    args.fill_jobs, args.fill_resolution, args.maxmemory_mb = 8, 2048, 48
    args.list_entries = 1_000_000 if quick else 3_000_000
    args.idem_cycles = 50 if quick else 200
    extra = dict(item.split("=", 1) for item in args.env)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="abuse-") as tmp:
        receiver, slow = Receiver(), SocketTrap(drip_s=args.slow_s)
        stack = start_stack(
            Path(tmp),
            args.maxmemory_mb,
            args.waiters + args.streams,
            extra,
            webhook_ports=(receiver.port, slow.port),
        )
        print(f"- started: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
        sampler = MemorySampler(stack.redis)
        sampler.start()
        ctx = Ctx(args, stack, receiver, sampler, slow)
        probe_job = submit(stack.main, KEY_B).json()["id"]
        wait_terminal(stack.main, KEY_B, probe_job, 60)
        prober = Prober(f"{stack.main}/v1/inversions/{probe_job}", KEY_B)
        time.sleep(1.0)  # the prober's process starts
        rows = []
        try:
            for name, attack in ATTACKS + EDGE_ATTACKS:
                if name == "idle" or not args.only or name.split(":")[0] in args.only:
                    rows.append(run(ctx, name, attack))
        finally:
            prober.finish()
            sampler.running = False
            receiver.close()
            slow.close()
            with contextlib.suppress(Exception):
                stack.stop()
    print(table(rows, prober))
    idle_stats, attack_stats = prober.window(*rows[0].window), prober.window(*rows[1].window)
    ratio = attack_stats[0] / idle_stats[0] if idle_stats and attack_stats else None
    summary = {"seconds": round(time.monotonic() - started, 1), "waits_p50_vs_idle": ratio}
    print("RESULT " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

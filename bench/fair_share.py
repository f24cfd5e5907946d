"""Key B's latency while key A holds a backlog, against B on an idle worker.

One real worker (`InversionWorker`, in this process) drains a private Redis. Key A queues
`--backlog` jobs, as the gateway queues them (fair order included); once the worker is
busy with them, key B submits one job, from another thread: its latency is from its
enqueue to its end, as RQ recorded them. B's job is either like A's (it can join A's
batches) or shorter (fewer steps: it cannot, and must run after a batch of A's). Each
case runs with the fair share and with the gatherer before it (`FirstCome`: compatible
jobs in queue order up to the batch size, whoever owns them); B on an idle worker is the
reference. Prints a table of B's latency and its ratio to idle, and `RESULT {json}`.

    python bench/fair_share.py                    # tiny model, CPU, a few minutes
    python bench/fair_share.py --backlog 100 --steps 300 --resolution 128
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import TINY_QUEUE, start_redis  # noqa: E402
from ddim_inversion import imaging  # noqa: E402
from ddim_inversion.params import InversionParams  # noqa: E402
from worker.fair_share import FairShare  # noqa: E402

KEY_A = hashlib.sha256(b"bench key A").hexdigest()
KEY_B = hashlib.sha256(b"bench key B").hexdigest()


class FirstCome(FairShare):
    """The gatherer before the fair share: every owner may fill the whole batch."""

    def apportion(self, head_owner: str, waiting: Iterable[str], rows: int) -> dict[str, int]:
        return dict.fromkeys({head_owner, *waiting}, rows)


def enqueue(connection, owner: str, params: InversionParams, rgb) -> str:
    from service import jobs
    from service.settings import GatewaySettings
    from worker import rq_adapter

    settings = GatewaySettings(
        redis_url="redis://unused.invalid", job_timeout_s=3600, result_ttl_s=3600
    )
    queue = rq_adapter.open_queue(connection, TINY_QUEUE)
    return jobs.enqueue(connection, queue, settings, params, rgb, owner=owner).id


def time_b(connection, params: InversionParams, rgb, after_s: float, out: list[float]) -> None:
    """From another thread: B's job submitted `after_s` from now, timed to its end; then
    the rest of A's backlog is dropped, so that the burst worker ends after its batch."""
    from rq.job import Job, JobStatus
    from rq.serializers import JSONSerializer

    from worker.rq_adapter import open_queue

    time.sleep(after_s)
    job_id = enqueue(connection, KEY_B, params, rgb)
    job = Job(job_id, connection=connection, serializer=JSONSerializer)
    # Timed by RQ's records (microseconds), so that this thread can poll rarely: a tight
    # poll beside torch's CPU threads slows the very batches it times.
    while job.get_status(refresh=True) not in (JobStatus.FINISHED, JobStatus.FAILED):
        time.sleep(0.1)
    open_queue(connection, TINY_QUEUE).empty()
    job.refresh()
    assert job.enqueued_at is not None and job.ended_at is not None
    out.append((job.ended_at - job.enqueued_at).total_seconds())


def run_case(args, model, url, backlog: int, b_params, a_params, rgb, first_come: bool) -> float:
    """B's latency, with `backlog` jobs of A queued first (0: an idle worker)."""
    import redis

    from worker.batching import InversionWorker
    from worker.rq_adapter import open_queue
    from worker.settings import WorkerSettings

    connection = redis.Redis.from_url(url)
    connection.flushdb()
    for _ in range(backlog):
        enqueue(connection, KEY_A, a_params, rgb)
    settings = WorkerSettings(redis_url=url, max_batch_wait_ms=0)
    queue = open_queue(connection, TINY_QUEUE)
    worker = InversionWorker(
        [queue],
        connection=connection,
        model=model,
        settings=settings,
        max_batch_size=args.max_batch_size,
    )
    if first_come:
        worker.share = FirstCome({}, worker.share.account)
    latency: list[float] = []
    side = redis.Redis.from_url(url)
    # B arrives once the worker is inside A's backlog (or at once on an idle worker, where
    # the burst worker is started after B's thread has queued it).
    after = args.arrive_after_s if backlog else 0.0
    thread = threading.Thread(target=time_b, args=(side, b_params, rgb, after, latency))
    thread.start()
    if not backlog:
        while not connection.llen(queue.key):
            time.sleep(0.001)
    worker.work(burst=True, logging_level="WARNING")
    thread.join()
    return latency[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backlog", type=int, default=100, help="key A's queued jobs")
    parser.add_argument("--steps", type=int, default=20, help="steps of A's jobs")
    parser.add_argument("--short-steps", type=int, default=10, help="steps of B's short job")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--arrive-after-s", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        import torch

        # One thread: on a CPU shared with other work, spinning OpenMP threads make batch
        # times swing by seconds, which would drown the waits measured here.
        torch.set_num_threads(args.threads)

    from worker.main import warm_up
    from worker.models import load_model

    model = load_model("tiny", device="cpu", dtype="float32")
    warm_up(model)
    size = (args.resolution, args.resolution)
    rgb = imaging.normalize((ROOT / "samples" / "chelsea.png").read_bytes(), size)
    base = {"prompt": "a photo", "resolution": size, "guidance_scale": args.guidance}
    a_params = InversionParams(**base, num_inference_steps=args.steps)
    url, server = start_redis()
    out: dict[str, object] = {"backlog": args.backlog, "max_batch_size": args.max_batch_size}
    print("| B's job | idle s | fair share s (x idle) | first come s (x idle) |")
    print("| --- | --- | --- | --- |")
    try:
        for label, steps in (("like A's", args.steps), ("shorter", args.short_steps)):
            b_params = InversionParams(**base, num_inference_steps=steps)
            idle, fair, full = (
                statistics.median(
                    run_case(args, model, url, backlog, b_params, a_params, rgb, first_come)
                    for _ in range(args.repeats)
                )
                for backlog, first_come in ((0, False), (args.backlog, False), (args.backlog, True))
            )
            out[label] = {"idle_s": idle, "fair_share_s": fair, "first_come_s": full}
            print(
                f"| {label} ({steps} steps) | {idle:.3f} | {fair:.3f} ({fair / idle:.1f}x) | "
                f"{full:.3f} ({full / idle:.1f}x) |"
            )
    finally:
        server.terminate()
    print("RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

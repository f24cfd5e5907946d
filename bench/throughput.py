"""Throughput of the batching worker against the plain diffusers loop, same model and machine.

N jobs are queued in a real Redis exactly as a gateway queues them (normalised RGB beside
an RQ job) and drained by the real worker (`InversionWorker`, in this process so that
the model is shared with the reference). The reference is the loop a user would write
with diffusers, one image at a time and at its best batch size. Prints images/s for
each, the ratios, the latency of one job on an idle worker, and a final `RESULT {json}`.

    python bench/throughput.py                 # tiny model, CPU
    python bench/throughput.py --sd15 --jobs 64 --max-batch-size 32   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ddim_inversion import imaging  # noqa: E402
from ddim_inversion.contract import JOB_FUNCTION, JobPayload  # noqa: E402
from ddim_inversion.keys import input_key, queue_name_for  # noqa: E402
from ddim_inversion.params import InversionParams  # noqa: E402

TINY_QUEUE = queue_name_for("tiny")
"""The queue of the tiny model's jobs, which the workers here drain."""


def start_redis() -> tuple[str, subprocess.Popen[bytes]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is needed (or pass --redis-url)")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except Exception:
            time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0", process


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def enqueue_all(connection, arrays, prompts, steps, size) -> list[str]:
    from rq import Queue
    from rq.serializers import JSONSerializer

    queue = Queue(TINY_QUEUE, connection=connection, serializer=JSONSerializer)
    ids = []
    for array, prompt in zip(arrays, prompts, strict=True):
        job_id = str(uuid.uuid4())
        params = InversionParams(prompt=prompt, num_inference_steps=steps, resolution=size)
        connection.set(input_key(job_id), array.tobytes())
        payload = JobPayload(params=params, image_width=size[0], image_height=size[1])
        queue.enqueue(
            JOB_FUNCTION,
            kwargs={"payload": payload.model_dump(mode="json")},
            job_id=job_id,
            job_timeout=3600,
            result_ttl=3600,
        )
        ids.append(job_id)
    return ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--sd15", action="store_true", help="SD 1.5-shaped random weights")
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--reference-batches", default="1,4,8", help="plain loop batch sizes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args()

    import redis

    from bench.engine import plain_loop
    from worker.batching import InversionWorker
    from worker.main import warm_up
    from worker.models import load_model
    from worker.settings import WorkerSettings

    name = args.model
    if args.sd15:
        from bench.sd15 import make_sd15_model

        name = str(make_sd15_model(Path(tempfile.mkdtemp(prefix="sd15-"))))
    model = load_model(name, device=args.device, dtype=args.dtype)
    warm_up(model)
    size = model.native_resolution
    samples = sorted((ROOT / "samples").glob("*.png"))
    arrays = [
        imaging.normalize(samples[i % len(samples)].read_bytes(), size) for i in range(args.jobs)
    ]
    prompts = [f"a photograph, variant {i}" for i in range(args.jobs)]
    out: dict[str, object] = {"device": str(model.device), "dtype": str(model.dtype)}
    if model.device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name()

    # Reference: the plain loop, one image at a time and at each batch size.
    reference: dict[str, float] = {}
    for batch in [int(b) for b in args.reference_batches.split(",")]:
        batch = min(batch, args.jobs)
        plain_loop(model, arrays[:batch], prompts[:batch], 2)  # warm this shape
        sync(model.device)
        rounds = max(1, args.jobs // batch)
        started = time.perf_counter()
        for begin in range(0, rounds * batch, batch):
            plain_loop(
                model, arrays[begin : begin + batch], prompts[begin : begin + batch], args.steps
            )
        sync(model.device)
        reference[f"plain_bs{batch}"] = rounds * batch / (time.perf_counter() - started)
        print(f"plain diffusers loop, batch {batch}: {reference[f'plain_bs{batch}']:.2f} images/s")
    out["reference_images_per_s"] = reference

    url, server = (args.redis_url, None) if args.redis_url else start_redis()
    try:
        connection = redis.Redis.from_url(url)
        connection.flushdb()
        settings = WorkerSettings(redis_url=url, max_batch_wait_ms=0)
        from rq import Queue
        from rq.serializers import JSONSerializer

        queue = Queue(TINY_QUEUE, connection=connection, serializer=JSONSerializer)

        def drain() -> InversionWorker:
            worker = InversionWorker(
                [queue],
                connection=connection,
                model=model,
                settings=settings,
                max_batch_size=args.max_batch_size,
            )
            worker.work(burst=True, logging_level="WARNING")
            return worker

        # One job on an idle worker: dequeue to stored result.
        latencies = []
        for i in range(3):
            enqueue_all(connection, arrays[i : i + 1], prompts[i : i + 1], args.steps, size)
            started = time.perf_counter()
            drain()
            latencies.append(time.perf_counter() - started)
        out["one_job_latency_s"] = statistics.median(latencies)
        print(f"one job on an idle worker: {out['one_job_latency_s']:.3f} s (median of 3)")

        ids = enqueue_all(connection, arrays, prompts, args.steps, size)
        started = time.perf_counter()
        worker = drain()
        elapsed = time.perf_counter() - started
        finished = len(queue.finished_job_registry.get_job_ids())
        assert finished >= len(ids), f"only {finished} of {len(ids)} jobs finished"
        service = args.jobs / elapsed
        out["service_images_per_s"] = service
        # Batched results against one-at-a-time ones, in this dtype on this device.
        from ddim_inversion.keys import result_key
        from worker.engine.dispatch import invert
        from worker.engine.types import InversionRequest, load_result

        worst = 0.0
        for i in range(min(4, args.jobs)):
            batched, _ = load_result(connection.get(result_key(ids[i])))
            params = InversionParams(
                prompt=prompts[i], num_inference_steps=args.steps, resolution=size
            )
            (solo,) = invert(model, [InversionRequest(arrays[i], params)])
            worst = max(worst, float((batched["latents"] - solo.latents).abs().max()))
        out["batched_vs_solo_max_abs"] = worst
        print(f"batched vs one-at-a-time latents: max abs difference {worst:.2e} ({model.dtype})")
        out["service_batches"] = worker.batches_run
        best = max(reference.values())
        one = reference.get("plain_bs1", best)
        out["ratio_vs_plain_one_at_a_time"] = service / one
        out["ratio_vs_plain_best_batch"] = service / best
        print(
            f"service (worker, batches of up to {args.max_batch_size}): {service:.2f} images/s; "
            f"{service / one:.2f}x the one-at-a-time loop, {service / best:.2f}x its best batch"
        )
    finally:
        if server is not None:
            server.terminate()
    print("RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

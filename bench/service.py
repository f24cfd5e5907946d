"""What the service adds around the engine: HTTP, validation, Redis, RQ, serialisation.

Starts a private redis-server, a real gateway and a real worker (tiny model, one CPU
thread each), and in this process loads the same model to call the engine directly on
the same inputs. Then, one job at a time, times submit (with `Prefer: wait`, so the
answer comes when the job ends) -> latents downloaded and subtracts the engine's own time
for that input: the per-job service overhead (median, p95; target under 15 ms). Each
input runs twice through each path and the faster run counts on both sides, so that
scheduling noise on a busy machine inflates neither. Where the time goes is printed from
the client's clock and the job's own RQ timestamps. Finally N jobs submitted at once
against N direct engine calls: the throughput ratio. Prints `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError("the service did not come up")


def run_job(
    client: httpx.Client,
    image: bytes,
    steps: int,
    prompt: str,
    moments: dict[str, float] | None = None,
) -> tuple[float, str]:
    """Submit with `Prefer: wait`, then download: the latency a client sees.

    `moments` receives the wall-clock times of the submission, its answer and the download's
    end, to place the job's own RQ timestamps between them."""
    submitted = time.time()
    started = time.perf_counter()
    answer = client.post(
        "/v1/inversions",
        files={"image": ("image.png", image, "image/png")},
        data={"prompt": prompt, "num_inference_steps": str(steps)},
        headers={"Prefer": "wait=60"},
    )
    answer.raise_for_status()
    answered = time.time()
    job = answer.json()
    if job["status"] != "succeeded":
        raise RuntimeError(job)
    client.get(job["urls"]["latents"]).raise_for_status()
    elapsed = time.perf_counter() - started
    if moments is not None:
        moments.update(submitted=submitted, answered=answered, downloaded=time.time())
    return elapsed, job["id"]


def phases_of(moments: dict[str, float], job: Any, engine_s: float) -> dict[str, float]:
    """Where one job's latency went, in ms, from the client's clock and RQ's timestamps."""

    def epoch(moment: datetime) -> float:
        return moment.replace(tzinfo=timezone.utc).timestamp()

    enqueued, started, ended = epoch(job.enqueued_at), epoch(job.started_at), epoch(job.ended_at)
    return {
        "submit_to_enqueued": 1000 * (enqueued - moments["submitted"]),
        "queue_wait": 1000 * (started - enqueued),
        "worker_around_engine": 1000 * (ended - started - engine_s),
        "ended_to_answer": 1000 * (moments["answered"] - ended),
        "download": 1000 * (moments["downloaded"] - moments["answered"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from ddim_inversion import imaging
    from ddim_inversion.params import InversionParams
    from worker.engine.dispatch import invert
    from worker.engine.types import InversionRequest
    from worker.main import warm_up
    from worker.models import load_model

    cache = Path(tempfile.mkdtemp(prefix="bench-models-"))
    model = load_model("tiny", device="cpu", dtype="float32", cache_dir=cache)
    warm_up(model)
    samples = sorted((ROOT / "samples").glob("*.png"))
    images = [samples[i % len(samples)].read_bytes() for i in range(args.jobs)]
    prompts = [f"a photograph, variant {i}" for i in range(args.jobs)]

    def engine_once(i: int) -> float:
        started = time.perf_counter()
        array = imaging.normalize(images[i], model.native_resolution)
        params = InversionParams(prompt=prompts[i], num_inference_steps=args.steps)
        invert(model, [InversionRequest(array, params)])
        return time.perf_counter() - started

    redis_port = free_port()
    data = tempfile.mkdtemp(prefix="bench-redis-")
    children = [
        subprocess.Popen(
            [
                *(shutil.which("redis-server") or "redis-server", "--port", str(redis_port)),
                *("--save", "", "--appendonly", "no", "--dir", data),
            ],
            stdout=subprocess.DEVNULL,
        )
    ]
    port = free_port()
    env = os.environ | {
        "INVERSION_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "INVERSION_MODEL": "tiny",
        "INVERSION_MODEL_CACHE_DIR": str(cache),
        "INVERSION_DEVICE": "cpu",
        "INVERSION_THREADS": "1",
        "INVERSION_AUTH_DISABLED": "true",
        "INVERSION_PORT": str(port),
    }
    log = open(Path(data) / "service.log", "wb")  # noqa: SIM115
    children.append(
        subprocess.Popen([str(BIN / "ddim-invert"), "gateway"], env=env, stdout=log, stderr=log)
    )
    children.append(
        subprocess.Popen([str(BIN / "ddim-invert"), "worker"], env=env, stdout=log, stderr=log)
    )
    base = f"http://127.0.0.1:{port}"
    import redis
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from ddim_inversion.contract import META_ENGINE_S

    connection = redis.Redis(port=redis_port)
    out: dict[str, object] = {"jobs": args.jobs, "steps": args.steps, "machine": "cpu"}
    try:
        # A live worker (readiness needs none; /v1/capacity lists them).
        wait_until(lambda: httpx.get(base + "/v1/capacity").json()["workers"], 120)
        with httpx.Client(base_url=base, timeout=60) as client:
            run_job(client, images[0], args.steps, "warm-up")
            overheads, engine_times, latencies, around = [], [], [], []
            phases: list[dict[str, float]] = []
            for i in range(args.jobs):
                # The best of two on both sides: noise on a busy machine inflates neither.
                engine_s = min(engine_once(i), engine_once(i))
                runs = []
                for _ in range(2):
                    moments: dict[str, float] = {}
                    runs.append(
                        (*run_job(client, images[i], args.steps, prompts[i], moments), moments)
                    )
                latency, job_id, moments = min(runs, key=lambda run: run[0])
                engine_times.append(engine_s)
                latencies.append(latency)
                overheads.append(latency - engine_s)
                # The engine's own time for this very job, as the worker measured it.
                job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
                around.append(latency - job.meta[META_ENGINE_S])
                phases.append(phases_of(moments, job, job.meta[META_ENGINE_S]))
            if phases:
                out["phases_median_ms"] = {
                    name: round(statistics.median(p[name] for p in phases), 2) for name in phases[0]
                }
                print(
                    "where it goes (median ms): "
                    + ", ".join(f"{k} {v:.1f}" for k, v in out["phases_median_ms"].items())
                )
            overheads.sort()
            around.sort()
            out["around_engine_median_ms"] = 1000 * statistics.median(around)
            out["around_engine_p95_ms"] = 1000 * around[int(0.95 * (len(around) - 1))]
            print(
                f"service time around the worker's own engine call: median "
                f"{out['around_engine_median_ms']:.1f} ms, p95 {out['around_engine_p95_ms']:.1f} ms"
            )
            out["engine_median_s"] = statistics.median(engine_times)
            out["service_latency_median_s"] = statistics.median(latencies)
            out["overhead_median_ms"] = 1000 * statistics.median(overheads)
            out["overhead_p95_ms"] = 1000 * overheads[int(0.95 * (len(overheads) - 1))]
            print(
                f"per-job service overhead: median {out['overhead_median_ms']:.1f} ms, "
                f"p95 {out['overhead_p95_ms']:.1f} ms "
                f"(engine alone {1000 * out['engine_median_s']:.1f} ms)"
            )

            started = time.perf_counter()
            for i in range(args.jobs):
                engine_once(i)
            direct = time.perf_counter() - started
            started = time.perf_counter()
            ids = []
            for i in range(args.jobs):
                answer = client.post(
                    "/v1/inversions",
                    files={"image": ("image.png", images[i], "image/png")},
                    data={"prompt": prompts[i], "num_inference_steps": str(args.steps)},
                )
                ids.append(answer.json()["id"])
            for job_id in ids:
                while client.get(f"/v1/inversions/{job_id}").json()["status"] != "succeeded":
                    time.sleep(0.002)
            through_service = time.perf_counter() - started
            out["engine_direct_images_per_s"] = args.jobs / direct
            out["service_images_per_s"] = args.jobs / through_service
            out["throughput_ratio_service_vs_engine"] = direct / through_service
            print(
                f"throughput: service {out['service_images_per_s']:.2f} images/s, engine direct "
                f"{out['engine_direct_images_per_s']:.2f} images/s, "
                f"ratio {out['throughput_ratio_service_vs_engine']:.2f} (batching makes it > 1)"
            )
    finally:
        for child in reversed(children):
            child.terminate()
        for child in children:
            child.wait(20)
    print("RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

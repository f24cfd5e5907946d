"""One family of `bench/real_size.py` through the real service: a private redis-server, the
gateway process and a worker process serving the written model folder; the sample
photograph submitted over HTTP, followed to its end and its latents downloaded.

What each figure is, all from the running service:

- peak memory: the worker process's VmHWM (/proc/<pid>/status), read before it is
  stopped: loading, warm-up (if on) and the job.
- per step: the job's progress as its status shows it (step 1 written by the worker when
  the first step ends) to its `timings.finished_at`: the last step, plus storing the result,
  less up to one poll interval.
- VAE encode + text: the engine's own time for the job (the `engine_s` the worker writes
  into the job's RQ meta) less the steps at that per-step time.
- end to end: the client's clock from the POST to the latents downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POLL_S = 0.25
"""How often the job's status is read while it runs (the per-step figure's resolution)."""

STARTUP_TIMEOUT_S = 1800
"""Loading a real-size folder (and warming it up) on a CPU takes minutes."""

JOB_TIMEOUT_S = 3600


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def epoch(moment: str) -> float:
    return datetime.fromisoformat(moment.replace("Z", "+00:00")).timestamp()


def peak_rss_gib(pid: int) -> float:
    """VmHWM of a live process: its peak resident memory since it started."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no VmHWM for process {pid}")


def service_env(
    folder: str, name: str, redis_port: int, port: int, threads: int, warmup: bool
) -> dict[str, str]:
    """Gateway and worker settings: a CPU worker serving the folder, limits that a job of
    minutes per step stays within (job timeout; lost only after an hour without a step)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVERSION_")}
    return env | {
        "INVERSION_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "INVERSION_PORT": str(port),
        "INVERSION_AUTH_DISABLED": "true",
        "INVERSION_MODEL": folder,
        "INVERSION_MODEL_NAME": name,
        "INVERSION_DEVICE": "cpu",
        "INVERSION_DTYPE": "float32",
        "INVERSION_THREADS": str(threads),
        "INVERSION_WARMUP": "true" if warmup else "false",
        "INVERSION_MAX_BATCH_SIZE": "1",
        "INVERSION_MAX_RETRIES": "0",
        "INVERSION_JOB_TIMEOUT_S": str(JOB_TIMEOUT_S),
        "INVERSION_LOST_AFTER_S": str(JOB_TIMEOUT_S),
        "INVERSION_WORKER_STALE_S": str(JOB_TIMEOUT_S),
    }


def wait_ready(base: str, worker: subprocess.Popen[bytes], log: Path) -> None:
    """Until the gateway lists a live worker (the model loaded, warmed up if asked)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError("the worker exited:\n" + log.read_text()[-3000:])
        try:
            if httpx.get(base + "/v1/capacity", timeout=5).json().get("workers"):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError("the worker did not become ready")


def follow(client: httpx.Client, job_id: str) -> tuple[dict[str, Any], dict[int, float]]:
    """Poll the job to its end: its last status body, and when each step was first seen."""
    seen: dict[int, float] = {}
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        body = client.get(f"/v1/inversions/{job_id}").raise_for_status().json()
        if body.get("progress"):
            seen.setdefault(body["progress"]["step"], time.time())
        if body["status"] in ("succeeded", "failed", "canceled"):
            return body, seen
        time.sleep(POLL_S)
    raise TimeoutError(f"job {job_id} did not end")


def invert_over_http(
    base: str, image: bytes, size: int, steps: int, guidance: float
) -> dict[str, Any]:
    """Submit, follow, download and check the latents; the job's figures."""
    from safetensors.numpy import load as load_safetensors

    with httpx.Client(base_url=base, timeout=600) as client:
        started = time.perf_counter()
        answer = client.post(
            "/v1/inversions",
            files={"image": ("chelsea.png", image, "image/png")},
            data={
                "prompt": "a photo of a cat",
                "num_inference_steps": str(steps),
                "guidance_scale": str(guidance),
                "resolution": f"{size}x{size}",
            },
        )
        answer.raise_for_status()
        body, seen = follow(client, answer.json()["id"])
        if body["status"] != "succeeded":
            raise RuntimeError(f"the job ended {body['status']}: {body.get('error')}")
        data = client.get(body["urls"]["latents"]).raise_for_status().content
        end_to_end = time.perf_counter() - started
    latents = load_safetensors(data)["latents"]
    expected = (1, 4, size // 8, size // 8)
    if latents.shape != expected:
        raise RuntimeError(f"latents {latents.shape}, expected {expected}")
    timings = body["timings"]
    out: dict[str, Any] = {
        "job_id": body["id"],
        "latents_shape": "x".join(str(n) for n in latents.shape),
        "queue_wait_s": timings["queue_wait_s"],
        "run_s": timings["run_s"],
        "end_to_end_http_s": round(end_to_end, 2),
    }
    if steps - 1 in seen:  # a step written before the last: from it to the job's end
        out["s_per_step"] = round(epoch(timings["finished_at"]) - seen[steps - 1], 2)
    return out


def engine_seconds(redis_port: int, job_id: str) -> float:
    """The engine's own time for the job, as the worker wrote it into the job's meta."""
    import redis
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from ddim_inversion.contract import META_ENGINE_S

    job = Job.fetch(job_id, connection=redis.Redis(port=redis_port), serializer=JSONSerializer)
    return float(job.meta[META_ENGINE_S])


def run_service(
    folder: str, name: str, size: int, steps: int, guidance: float, threads: int, warmup: bool
) -> dict[str, Any]:
    """Start Redis, the gateway and a worker on `folder`, invert the sample over HTTP."""
    redis_port, port = free_port(), free_port()
    scratch = Path(tempfile.mkdtemp(prefix="real-size-service-"))
    env = service_env(folder, name, redis_port, port, threads, warmup)
    redis_server = shutil.which("redis-server") or "redis-server"
    children = [
        subprocess.Popen(
            [
                redis_server,
                "--port",
                str(redis_port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(scratch),
            ],
            stdout=subprocess.DEVNULL,
        )
    ]
    log_path = scratch / "service.log"
    base = f"http://127.0.0.1:{port}"
    try:
        with open(log_path, "wb") as log:
            children.append(
                subprocess.Popen(
                    [str(BIN / "ddim-invert"), "gateway"], env=env, stdout=log, stderr=log
                )
            )
            started = time.perf_counter()
            worker = subprocess.Popen(
                [str(BIN / "ddim-invert"), "worker"], env=env, stdout=log, stderr=log
            )
            children.append(worker)
            wait_ready(base, worker, log_path)
            ready_s = time.perf_counter() - started
            image = (ROOT / "samples" / "chelsea.png").read_bytes()
            out = invert_over_http(base, image, size, steps, guidance)
            out["engine_s"] = round(engine_seconds(redis_port, out["job_id"]), 2)
            if "s_per_step" in out:
                encode = out["engine_s"] - steps * out["s_per_step"]
                out["vae_encode_and_text_s"] = round(max(encode, 0.0), 2)
            out["worker_ready_s"] = round(ready_s, 1)
            out["warmup"] = warmup
            out["peak_rss_gib"] = round(peak_rss_gib(worker.pid), 2)
    except Exception:
        print(log_path.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        for child in reversed(children):
            child.terminate()
        for child in children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
        shutil.rmtree(scratch, ignore_errors=True)
    return out

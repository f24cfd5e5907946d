"""A bounded burst load test: N HTTP clients against one gateway and one worker (tiny model).

Starts its own redis-server on a free port, a `ddim-invert gateway` and a `ddim-invert
worker` subprocess, then N asyncio clients each submit `--jobs-per-client` sample images
and poll every job until it is terminal. Every response is counted by status code.

Violations (exit status 1): any 5xx, a job id accepted twice, a 202 whose job never ended
terminal, or a job whose terminal status changed afterwards. Prints submit latency p50/p95,
the total time and a final `RESULT {json}`.

    python bench/load.py                                   # 16 clients x 4 jobs, 5 steps
    python bench/load.py --clients 8 --jobs-per-client 3 --steps 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
BIN = Path(sys.executable).parent
TERMINAL = {"succeeded", "failed", "canceled"}
REDIS_ARGS = ["--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Tally:
    codes: Counter = field(default_factory=Counter)
    submit_latencies: list[float] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    terminal: dict[str, str] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    gave_up: int = 0


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def start_stack(tmp: Path, env: dict[str, str]) -> tuple[str, list[subprocess.Popen[bytes]]]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed")
    redis_port, http_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env["INVERSION_REDIS_URL"] = redis_url
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, args: list[str]) -> None:
        log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115
        procs.append(
            subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        )

    spawn(
        "redis",
        [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(tmp), *REDIS_ARGS],
    )
    import redis

    client = redis.Redis.from_url(redis_url)
    wait_until(client.ping, 10, "redis-server")
    client.close()
    spawn("gateway", [str(BIN / "ddim-invert"), "gateway", "--port", str(http_port)])
    spawn("worker", [str(BIN / "ddim-invert"), "worker"])
    base = f"http://127.0.0.1:{http_port}"
    wait_until(lambda: httpx.get(base + "/v1/capacity").json()["workers"], 300, "gateway + worker")
    return base, procs


def stop_stack(procs: list[subprocess.Popen[bytes]]) -> None:
    for process in reversed(procs):
        if process.poll() is None:
            process.terminate()
    for process in procs:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


async def one_client(
    http: httpx.AsyncClient, index: int, args: argparse.Namespace, tally: Tally, deadline: float
) -> None:
    samples = sorted(SAMPLES.glob("*.png"))
    mine: list[str] = []
    for n in range(args.jobs_per_client):
        image = samples[(index + n) % len(samples)]
        data = {"prompt": f"client {index} job {n}", "num_inference_steps": str(args.steps)}
        while True:
            started = time.perf_counter()
            answer = await http.post(
                "/v1/inversions",
                data=data,
                files={"image": (image.name, image.read_bytes(), "image/png")},
            )
            tally.submit_latencies.append(time.perf_counter() - started)
            tally.codes[answer.status_code] += 1
            if answer.status_code == 202:
                job_id = answer.json()["id"]
                if job_id in tally.accepted:
                    tally.violations.append(f"job id {job_id} accepted twice")
                tally.accepted.append(job_id)
                mine.append(job_id)
                break
            if answer.status_code == 429 and time.monotonic() < deadline:
                await asyncio.sleep(min(float(answer.headers.get("retry-after", "1")), 2.0))
                continue
            if answer.status_code >= 500:
                tally.violations.append(f"POST answered {answer.status_code}: {answer.text[:200]}")
            tally.gave_up += 1
            break
    for job_id in mine:
        await poll(http, job_id, tally, deadline)


async def poll(http: httpx.AsyncClient, job_id: str, tally: Tally, deadline: float) -> None:
    while time.monotonic() < deadline:
        answer = await http.get(f"/v1/inversions/{job_id}")
        tally.codes[answer.status_code] += 1
        if answer.status_code == 200:
            state = answer.json()["status"]
            if state in TERMINAL:
                tally.terminal[job_id] = state
                again = await http.get(f"/v1/inversions/{job_id}")
                tally.codes[again.status_code] += 1
                if again.status_code != 200 or again.json()["status"] != state:
                    tally.violations.append(f"job {job_id} left its terminal status {state}")
                return
        elif answer.status_code >= 500:
            tally.violations.append(f"GET answered {answer.status_code}: {answer.text[:200]}")
        elif answer.status_code != 429:
            tally.violations.append(f"GET {job_id} answered {answer.status_code}")
            return
        await asyncio.sleep(0.1)
    tally.violations.append(f"job {job_id} did not end before the deadline")


async def run_clients(base: str, args: argparse.Namespace, tally: Tally) -> float:
    deadline = time.monotonic() + args.timeout
    limits = httpx.Limits(max_connections=args.clients * 2)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(
            *(one_client(http, i, args, tally, deadline) for i in range(args.clients))
        )
        return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--jobs-per-client", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the burst")
    args = parser.parse_args()

    env = {k: v for k, v in os.environ.items() if not k.startswith("INVERSION_")}
    env.update(
        INVERSION_AUTH_DISABLED="true",
        INVERSION_MODEL="tiny",
        INVERSION_DEVICE=os.environ.get("INVERSION_DEVICE", "cpu"),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    for name in ("INVERSION_MODEL_CACHE_DIR", "INVERSION_THREADS"):
        if name in os.environ:
            env[name] = os.environ[name]

    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="load-") as directory:
        tmp = Path(directory)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            base, procs = start_stack(tmp, env)
            total_s = asyncio.run(run_clients(base, args, tally))
            for process in procs:
                if process.poll() is not None:
                    tally.violations.append(f"{process.args[0]} exited with {process.returncode}")
        except Exception as exc:
            total_s = 0.0
            tally.violations.append(f"{type(exc).__name__}: {exc}")
            for log in sorted(tmp.glob("*.log")):
                print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
        finally:
            stop_stack(procs)

    accepted = set(tally.accepted)
    lost = sorted(accepted - set(tally.terminal))
    if lost:
        tally.violations.append(f"{len(lost)} accepted jobs never ended terminal")
    server_errors = sum(n for code, n in tally.codes.items() if code >= 500)
    if server_errors and not any("answered 5" in v for v in tally.violations):
        tally.violations.append(f"{server_errors} responses were 5xx")
    states = Counter(tally.terminal.values())
    result = {
        "clients": args.clients,
        "jobs_per_client": args.jobs_per_client,
        "steps": args.steps,
        "attempted": args.clients * args.jobs_per_client,
        "submitted": len(tally.accepted),
        "unique_ids": len(accepted),
        "completed": len(tally.terminal),
        "succeeded": states["succeeded"],
        "failed": states["failed"],
        "canceled": states["canceled"],
        "lost": len(lost),
        "not_submitted": tally.gave_up,
        "status_codes": {str(k): v for k, v in sorted(tally.codes.items())},
        "server_errors": server_errors,
        "submit_p50_ms": round(percentile(tally.submit_latencies, 50) * 1000, 1),
        "submit_p95_ms": round(percentile(tally.submit_latencies, 95) * 1000, 1),
        "total_s": round(total_s, 2),
        "violations": tally.violations[:20],
    }
    print(
        f"{result['submitted']} jobs from {args.clients} clients in {total_s:.2f} s; "
        f"submit p50 {result['submit_p50_ms']} ms, p95 {result['submit_p95_ms']} ms; "
        f"{result['succeeded']} succeeded, {result['failed']} failed; "
        f"codes {result['status_codes']}"
    )
    for violation in tally.violations:
        print(f"VIOLATION {violation}", file=sys.stderr)
    print("RESULT " + json.dumps(result), flush=True)
    return 1 if tally.violations else 0


if __name__ == "__main__":
    sys.exit(main())

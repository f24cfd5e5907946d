"""The Grafana dashboard's main panels, drawn from real data where Grafana cannot run.

Starts a private redis-server, a gateway and two tiny-model CPU workers, and a Prometheus
(the `prometheus` binary: Debian's package, or Prometheus' release) that scrapes the
gateway every second and evaluates docker/monitoring/alerts.yml. Then a scripted few
minutes: idle, a burst from bench/load.py's clients, a worker killed mid-job (its job
fails `worker_lost`: retries are off here), a job over the job timeout, a burst of
malformed requests, a second burst with one worker fewer, then idle. Finally it asks
Prometheus for each main panel's own PromQL (read from the dashboard JSON, Grafana's
`$__rate_interval` replaced) over the run, and draws the series with matplotlib into
docs/dashboard.png. Loopback only; bounded in time (about five minutes on a busy 2-core machine).

    python bench/dashboard_plot.py [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import load  # noqa: E402  (bench/load.py: its stack helpers and HTTP clients)

DASHBOARD = ROOT / "docker" / "monitoring" / "grafana" / "dashboards" / "ddim-inversion.json"
ALERTS = ROOT / "docker" / "monitoring" / "alerts.yml"
RATE_INTERVAL = "15s"
"""What `$__rate_interval` becomes: a few scrapes at the 1 s scrape interval used here."""

PANELS = (
    "Queue depth per model",
    "Estimated wait of a new job, per model",
    "Images/s per worker",
    "Live workers per model",
    "Job outcomes",
    "Failed jobs by code",
    "Queue wait percentiles per model",
    "Run time percentiles per model",
    "HTTP answers by status",
)
"""The dashboard's main panels, by title, in the figure's order."""

BURST_STEPS = 50
"""Steps of the burst jobs (tiny model at its native 64x64)."""

JOB_TIMEOUT_S = 20
"""The gateway's job timeout in this run: ordinary jobs take well under a second."""


def prometheus_config(directory: Path, gateway: str) -> Path:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "ddim-gateway", "static_configs": [{"targets": [gateway]}]}
        ],
    }
    path = directory / "prometheus.yml"
    path.write_text(json.dumps(config))  # YAML is a superset of JSON
    return path


def spawn(tmp: Path, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = open(tmp / f"{name}.log", "ab")  # noqa: SIM115
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def workers_alive(base: str) -> int:
    answer = httpx.get(base + "/v1/capacity")
    return len(answer.json()["workers"]) if answer.status_code == 200 else 0


def submit(base: str, steps: int, resolution: int) -> str:
    image = load.SAMPLES / "chelsea.png"
    with image.open("rb") as handle:
        answer = httpx.post(
            base + "/v1/inversions",
            data={
                "prompt": "a cat",
                "num_inference_steps": str(steps),
                "resolution": str(resolution),
            },
            files={"image": (image.name, handle, "image/png")},
        )
    answer.raise_for_status()
    return str(answer.json()["id"])


def wait_status(base: str, job_id: str, wanted: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(f"{base}/v1/inversions/{job_id}").json()["status"]
        if state in wanted:
            return str(state)
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} not {wanted} after {timeout} s")


def burst(base: str, clients: int, jobs: int, steps: int) -> None:
    args = argparse.Namespace(clients=clients, jobs_per_client=jobs, steps=steps, timeout=120.0)
    tally = load.Tally()
    asyncio.run(load.run_clients(base, args, tally))
    print(f"  burst: {len(tally.accepted)} jobs, answers {dict(tally.codes)}", flush=True)


def scenario(base: str, redis_url: str, tmp: Path, env: dict[str, str], workers: list) -> None:
    """The scripted run whose metrics the figure shows."""
    from redis import Redis
    from rq import Worker
    from rq.job import Job
    from rq.serializers import JSONSerializer

    connection = Redis.from_url(redis_url)
    print("idle", flush=True)
    time.sleep(15)
    print("burst 1", flush=True)
    burst(base, clients=10, jobs=8, steps=BURST_STEPS)
    time.sleep(10)
    print("a worker killed mid-job", flush=True)
    job_id = submit(base, steps=500, resolution=256)  # about half a minute on this CPU
    wait_status(base, job_id, {"running"}, 30)
    name = Job.fetch(job_id, connection=connection, serializer=JSONSerializer).worker_name
    worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + name, connection)
    (victim,) = [w for w in workers if worker is not None and w.pid == worker.pid]
    victim.send_signal(signal.SIGKILL)
    workers.remove(victim)
    print(f"  {job_id}: {wait_status(base, job_id, {'failed'}, 60)}", flush=True)
    print("a job over the job timeout", flush=True)
    job_id = submit(base, steps=500, resolution=256)
    print(f"  {job_id}: {wait_status(base, job_id, {'failed', 'succeeded'}, 90)}", flush=True)
    print("malformed requests", flush=True)
    for _ in range(40):
        httpx.post(base + "/v1/inversions", data={"prompt": "x"}, files={"image": ("x.png", b"no")})
        httpx.get(base + "/v1/inversions/not-a-job")
    print("burst 2, one worker", flush=True)
    burst(base, clients=10, jobs=6, steps=BURST_STEPS)
    print("a worker back", flush=True)
    workers.append(spawn(tmp, "worker-2", [str(load.BIN / "ddim-invert"), "worker"], env))
    load.wait_until(lambda: workers_alive(base) >= len(workers), 90, "the new worker")
    burst(base, clients=10, jobs=4, steps=BURST_STEPS)
    time.sleep(20)
    connection.close()


def query_range(prometheus: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    answer = httpx.get(
        prometheus + "/api/v1/query_range",
        params={"query": expr, "start": start, "end": end, "step": "1s"},
        timeout=30,
    )
    answer.raise_for_status()
    return list(answer.json()["data"]["result"])


def legend(template: str, labels: dict[str, str]) -> str:
    text = template
    for name, value in labels.items():
        text = text.replace("{{" + name + "}}", value)
    return text


def draw(prometheus: str, start: float, end: float, out: Path, fired: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]}
    figure, axes = plt.subplots(3, 3, figsize=(16, 11), sharex=True)
    for axis, title in zip(axes.flat, PANELS, strict=True):
        panel = panels[title]
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
            for series in query_range(prometheus, expr, start, end):
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                axis.plot(xs, ys, label=legend(target["legendFormat"], series["metric"]), lw=1.2)
        unit = panel["fieldConfig"]["defaults"]["unit"]
        axis.set_title(f"{title}" + (f" ({unit})" if unit not in ("short",) else ""), fontsize=10)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7, loc="upper right")
    for axis in axes[-1]:
        axis.set_xlabel("seconds into the run")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    cores = os.cpu_count()
    figure.suptitle(
        "DDIM inversion service: the Grafana dashboard's main panels, from Prometheus "
        f"(bench/dashboard_plot.py; tiny model, 2 CPU workers; {platform.machine()}, "
        f"{cores} cores, {when})\nalerts that fired: {', '.join(fired) or 'none'}",
        fontsize=11,
    )
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)
    print(f"wrote {out}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = parser.parse_args()
    binary = shutil.which("prometheus")
    if binary is None:
        sys.exit("needs the prometheus binary on PATH (Debian: apt-get install prometheus)")

    env = {k: v for k, v in os.environ.items() if not k.startswith("INVERSION_")}
    env.update(
        INVERSION_AUTH_DISABLED="true",
        INVERSION_MODEL="tiny",
        INVERSION_DEVICE="cpu",
        INVERSION_THREADS="1",
        INVERSION_MAX_RETRIES="0",
        INVERSION_JOB_TIMEOUT_S=str(JOB_TIMEOUT_S),
        # The long jobs run at 256x256, four times the tiny model's 64x64 side.
        INVERSION_MAX_RESOLUTION_SCALE="4",
        INVERSION_LOST_AFTER_S="4",
        INVERSION_HEARTBEAT_S="1",
        HF_HUB_OFFLINE="1",
    )
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        env.setdefault("INVERSION_MODEL_CACHE_DIR", str(tmp / "models"))
        base, procs = load.start_stack(tmp, env)  # redis, gateway, one worker
        workers = [procs[-1]]
        prometheus_port = load.free_port()
        prometheus = f"http://127.0.0.1:{prometheus_port}"
        try:
            workers.append(spawn(tmp, "worker-1", [str(load.BIN / "ddim-invert"), "worker"], env))
            load.wait_until(lambda: workers_alive(base) >= 2, 90, "two workers")
            procs.append(
                spawn(
                    tmp,
                    "prometheus",
                    [
                        binary,
                        f"--config.file={prometheus_config(tmp, base.removeprefix('http://'))}",
                        f"--storage.tsdb.path={tmp / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{prometheus_port}",
                    ],
                    env,
                )
            )
            load.wait_until(
                lambda: httpx.get(prometheus + "/-/ready").status_code == 200, 60, "prometheus"
            )
            start = time.time()
            scenario(base, env["INVERSION_REDIS_URL"], tmp, env, workers)
            end = time.time()
            fired = sorted(
                {
                    s["metric"]["alertname"]
                    for s in query_range(prometheus, 'ALERTS{alertstate="firing"}', start, end)
                }
            )
            draw(prometheus, start, end, args.out, fired)
        finally:
            load.stop_stack(procs + workers[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

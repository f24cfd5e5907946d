"""The service that `bench/abuse.py` attacks, and what watches it: processes, B's prober,
webhook receivers, Redis memory and worker heartbeats. Loopback only.

Processes: a private redis-server (small `maxmemory`, noeviction) and one tiny worker;
the `main` gateway (the one under test); a `strict` gateway with small per-key limits and
a short job timeout, for the attacks about those limits; a `parked` gateway whose queue
no worker drains, so that key A's jobs there stay queued (big inputs never reach the
worker; waiters wait on a job that does not end by itself).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ddim_inversion.keys import WORKERS_KEY  # noqa: E402
from service.auth import key_hash  # noqa: E402
from tests.conftest import Processes, RedisServer, subprocess_env  # noqa: E402

KEY_A, KEY_B = "abuse-key-a", "abuse-key-b"
"""The attacker and the tenant that works normally."""
KEY_A_RACES, KEY_A_REPLAYS, KEY_A_TIMEOUT = "abuse-key-a2", "abuse-key-a3", "abuse-key-a4"
"""More keys of the attacker on the strict gateway: each attack there starts with fresh
per-key counters."""
ALL_KEYS = (KEY_A, KEY_B, KEY_A_RACES, KEY_A_REPLAYS, KEY_A_TIMEOUT)
PARKED_QUEUE = "abuse-parked"
"""The parked gateway's queue prefix: no worker drains `abuse-parked:<model>`."""
STRICT = {
    "max_queued_per_key": 3,
    "rate_limit_per_minute": 5,
    "job_timeout_s": 2,
    "max_decodes_per_key": 30,  # the races wait for a decoder: the admission is under test
}
"""The strict gateway's limits (INVERSION_*)."""
BODY_TIMEOUT_S = 5
"""The main gateway's whole-body deadline (INVERSION_HTTP_BODY_TIMEOUT_S): short, so that
the held-bodies attack sees it act; every other attack's bodies arrive at once."""
METRICS_TOKEN = "abuse-metrics-token"
"""The token /metrics answers (INVERSION_METRICS_TOKEN_HASH is its hash)."""
METRICS_AUTH = {"Authorization": f"Bearer {METRICS_TOKEN}"}
PARKED_DECODES = {"decode_cpu_s": 1, "max_jpeg_scans": 1_000_000}
"""The parked gateway's decoding limits: any number of scans, through to 1 s of CPU."""


def tiny_png(size: int = 64) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (180, 90, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = tiny_png()


def submit(
    base: str, key: str, headers: dict[str, str] | None = None, timeout: float = 60, **fields: Any
) -> httpx.Response:
    """POST the tiny PNG; fields default to a 3-step job at 64 px."""
    data = {"prompt": "a cat", "num_inference_steps": "3", "resolution": "64"}
    data |= {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}
    return httpx.post(
        base + "/v1/inversions",
        data=data,
        files={"image": ("tiny.png", PNG, "image/png")},
        headers={"X-API-Key": key, **(headers or {})},
        timeout=timeout,
    )


def codes(statuses: Iterable[int | str]) -> str:
    """`202×3 429×2`: how often each answer came."""
    counted = Counter(statuses)
    return " ".join(f"{code}×{n}" for code, n in sorted(counted.items(), key=str)) or "-"


@dataclass
class Stack:
    redis: redis.Redis
    redis_url: str
    main: str
    strict: str
    parked: str
    procs: Processes
    worker: Any
    logs: Path
    server: RedisServer

    def worker_log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs.glob("worker-*.log"))

    def ensure_worker(self) -> bool:
        """Start a new worker if the last one exited; whether one had to be started."""
        if self.worker.poll() is None:
            return False
        self.worker = self.procs.worker()
        return True

    def workers(self, stale_s: float = 10.0) -> str:
        """Whether the worker process lives, and how many workers heartbeat in Redis."""
        alive = "alive" if self.worker.poll() is None else f"exited {self.worker.returncode}"
        now = time.time()
        fresh = 0
        for raw in self.redis.hgetall(WORKERS_KEY).values():
            if now - float(json.loads(raw)["heartbeat_at"]) < stale_s:
                fresh += 1
        return f"{alive}, {fresh} heartbeating"

    def stop(self) -> None:
        self.procs.stop_all()
        self.server.stop()


def start_stack(
    tmp: Path,
    maxmemory_mb: int,
    waiters_cap: int,
    extra_env: dict[str, str],
    webhook_ports: tuple[int, ...],
) -> Stack:
    """Redis, a worker and three gateways. Webhooks may go to 127.0.0.1 on `webhook_ports`
    only (the bench's receivers): loopback is private, so private targets are allowed, and
    `localhost` stays off the host allow-list (the private target attack 5 aims at)."""
    server = RedisServer(
        tmp, ["--maxmemory", f"{maxmemory_mb}mb", "--maxmemory-policy", "noeviction"]
    )
    server.start()
    cache = os.environ.get("INVERSION_MODEL_CACHE_DIR", str(ROOT / ".cache" / "models"))
    env = subprocess_env(server.url, Path(cache))
    env["INVERSION_AUTH_DISABLED"] = "false"
    env["INVERSION_API_KEY_HASHES"] = ",".join(key_hash(k) for k in ALL_KEYS)
    env["INVERSION_WEBHOOK_ALLOWED_HOSTS"] = "127.0.0.1"
    env["INVERSION_WEBHOOK_ALLOWED_PORTS"] = ",".join(map(str, webhook_ports))
    env["INVERSION_WEBHOOK_ALLOW_PRIVATE"] = "true"
    env["INVERSION_METRICS_TOKEN_HASH"] = key_hash(METRICS_TOKEN)
    procs = Processes(env | extra_env, tmp)
    try:
        worker = procs.worker(wait=False)  # its model loads while the gateways start
        main = procs.gateway(
            INVERSION_MAX_WAITERS_PER_KEY=str(waiters_cap),
            INVERSION_HTTP_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
        )
        strict = procs.gateway(**{f"INVERSION_{k.upper()}": str(v) for k, v in STRICT.items()})
        parked = procs.gateway(
            INVERSION_QUEUE_NAME=PARKED_QUEUE,
            **{f"INVERSION_{k.upper()}": str(v) for k, v in PARKED_DECODES.items()},
        )
        client = redis.Redis.from_url(server.url)
        deadline = time.monotonic() + 180
        while not client.hlen(WORKERS_KEY):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start: {procs.log_text()}")
            time.sleep(0.2)
    except BaseException:
        procs.stop_all()
        server.stop()
        raise
    return Stack(client, server.url, main, strict, parked, procs, worker, tmp, server)


# -- key B's prober, in a process of its own (the attack's client work must not slow it) -


def _probe(url: str, key: str, stop: Any, out: Any) -> None:
    samples: list[tuple[float, float, int]] = []
    with httpx.Client(headers={"X-API-Key": key}, timeout=30) as http:
        while not stop.is_set():
            started = time.perf_counter()
            moment = time.time()
            try:
                code = http.get(url).status_code
            except httpx.HTTPError:
                code = 0
            samples.append((moment, (time.perf_counter() - started) * 1000, code))
            time.sleep(0.02)
    out.put(samples)


class Prober:
    """GETs one of key B's jobs every 20 ms for the whole run; latencies per window."""

    def __init__(self, url: str, key: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._out = context.Queue()
        self._process = context.Process(target=_probe, args=(url, key, self._stop, self._out))
        self._process.start()
        self.samples: list[tuple[float, float, int]] = []

    def finish(self) -> None:
        self._stop.set()
        self.samples = self._out.get(timeout=60)
        self._process.join(10)

    def window(self, start: float, end: float) -> tuple[float, float, int] | None:
        """(p50 ms, p95 ms, non-200 answers) of the GETs in flight during [start, end]
        (a GET that took longer than the window counts too)."""
        inside = [(ms, code) for t, ms, code in self.samples if t <= end and t + ms / 1000 >= start]
        if len(inside) < 2:
            return None
        latencies = sorted(ms for ms, _ in inside)
        p95 = statistics.quantiles(latencies, n=20)[-1]
        return statistics.median(latencies), p95, sum(code != 200 for _, code in inside)


class MemorySampler(threading.Thread):
    """Redis `used_memory` every 0.25 s, for each attack's peak."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.samples: list[tuple[float, int]] = []
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                used = int(self.client.info("memory")["used_memory"])
                self.samples.append((time.time(), used))
            except redis.RedisError:
                pass
            time.sleep(0.25)

    def peak_mb(self, start: float, end: float) -> float:
        inside = [used for t, used in self.samples if start <= t <= end + 0.5]
        return max(inside, default=0) / 2**20


# -- webhook receivers ---------------------------------------------------------------------


class Receiver:
    """Answers 200 at once and records when each job's delivery arrived."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.arrivals[json.loads(body)["id"]] = time.time()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class SocketTrap:
    """A listener that records connections; with `drip_s`, it answers each one with a
    header byte every 2 s for that long (a slow receiver), else closes it at once."""

    drip_s: float = 0.0
    connections: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.open:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(time.time())
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            ends = time.monotonic() + self.drip_s
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\n") if self.drip_s else None
                while self.open and time.monotonic() < ends:
                    conn.sendall(b"X")
                    time.sleep(2)
            except OSError:
                pass

    def close(self) -> None:
        self.open = False
        self.sock.close()


# -- reading the service -------------------------------------------------------------------

TERMINAL = {"succeeded", "failed", "canceled"}


def view_of(base: str, key: str, job: str) -> dict[str, Any]:
    answer = httpx.get(f"{base}/v1/inversions/{job}", headers={"X-API-Key": key}, timeout=30)
    return answer.json() if answer.status_code == 200 else {"status": f"GET {answer.status_code}"}


def wait_terminal(base: str, key: str, job: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        view = view_of(base, key, job)
        if view.get("status") in TERMINAL or time.monotonic() > deadline:
            return view
        time.sleep(0.05)


def delete(base: str, key: str, job: str) -> int:
    url = f"{base}/v1/inversions/{job}"
    return httpx.delete(url, headers={"X-API-Key": key}, timeout=30).status_code

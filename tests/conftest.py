"""Fixtures shared by every test: a private Redis, the tiny model, real service processes.

Redis is a real `redis-server` started on a free port for the test session (never the
machine's shared one), so tests can flush, stop and restart it freely.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from worker.rq_worker import SHUTDOWN_S

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
BIN = Path(sys.executable).parent

# Last guards. A test waits for events and states (a process registered, a job ended, a
# process exited), never for time to pass, and asserts nothing about how fast a thing
# happens: a slower machine only takes longer. Each wait still has a guard, so that an
# event that never comes fails the test instead of hanging the suite. A guard is reached
# only when something is broken, so it costs nothing while tests pass and is generous:
# several times the bound a process itself states where it states one; where none is
# stated, minutes.

GUARD_FACTOR = 4
"""How many times a process's stated bound a test waits before calling the event lost."""

STOP_GUARD_S = GUARD_FACTOR * SHUTDOWN_S
"""A process's exit once stopped: the worker's stated bound (worker.rq_worker.SHUTDOWN_S,
from SIGTERM to exit when idle, or from its batch's end when busy) times GUARD_FACTOR. The
gateway and redis-server, which hold nothing to finish, get the same."""

EVENT_GUARD_S = 300.0
"""An event that no process bounds in time: a process's start (torch imported, a model
loaded and warmed up), a short job's end behind a few others, a subscription, a webhook
delivery. Each takes seconds; five minutes leaves room for any machine that runs the
suite at all, loaded or not."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


class RedisServer:
    """A private redis-server process that tests may stop and start again on the same port."""

    def __init__(self, directory: Path, extra: list[str] | None = None) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.extra = extra or []
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.exit("redis-server is not installed (apt-get install redis-server)", 2)
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
        ]
        args += ["--save", "", "--appendonly", "no", *self.extra]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        import redis

        client = redis.Redis.from_url(self.url)
        wait_for(client.ping, EVENT_GUARD_S, "redis-server to answer")
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(STOP_GUARD_S)
            self.process = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A clean database for each test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[object]:
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tiny model is generated once per session, for this process and subprocesses."""
    from worker.tiny_model import tiny_model_dir

    directory = tmp_path_factory.mktemp("models")
    tiny_model_dir(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model(model_cache_dir: Path) -> object:
    from worker.models import load_model

    return load_model("tiny", device="cpu", dtype="float32", cache_dir=model_cache_dir)


WORKER_THREADS = 1
"""torch threads of every test worker, and of in-process engine runs compared with them."""


def subprocess_env(redis_url: str, model_cache_dir: Path) -> dict[str, str]:
    """Environment for gateway and worker subprocesses: one Redis, the cached tiny model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVERSION_")}
    env.update(
        INVERSION_REDIS_URL=redis_url,
        INVERSION_MODEL="tiny",
        INVERSION_MODEL_CACHE_DIR=str(model_cache_dir),
        INVERSION_DEVICE="cpu",
        INVERSION_THREADS=str(WORKER_THREADS),
        INVERSION_AUTH_DISABLED="true",
        # Jobs that name no model run on the tiny one, also while no worker serves it.
        INVERSION_DEFAULT_MODEL="tiny",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def service_env(redis_url: str, model_cache_dir: Path) -> dict[str, str]:
    """Environment for this test's own processes: this test's (flushed) Redis."""
    return subprocess_env(redis_url, model_cache_dir)


@contextmanager
def worker_threads() -> Iterator[None]:
    """Run in-process torch code with the test workers' thread count.

    The count decides how CPU kernels split their sums: results compared bit for bit
    with a worker's must be computed with the same one.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(WORKER_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Processes:
    """Service processes started by a test and stopped after it, whatever happens."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}-{len(self.started)}.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            args, env=self.env | env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        self.started.append(process)
        return process

    def gateway(self, **env: str) -> str:
        port = free_port()
        self.spawn("gateway", [str(BIN / "ddim-invert"), "gateway", "--port", str(port)], **env)
        url = f"http://127.0.0.1:{port}"
        import httpx

        wait_for(
            lambda: httpx.get(url + "/healthz").status_code == 200, EVENT_GUARD_S, "the gateway"
        )
        return url

    def worker(self, wait: bool = True, **env: str) -> subprocess.Popen[bytes]:
        (process,) = self.workers(1, wait, **env)
        return process

    def workers(self, count: int, wait: bool = True, **env: str) -> list[subprocess.Popen[bytes]]:
        """Start `count` workers at once (their model loads overlap), then wait until each
        has registered, unless `wait` is false."""
        import redis

        from ddim_inversion.keys import WORKERS_KEY

        client = redis.Redis.from_url(self.env["INVERSION_REDIS_URL"])
        before = set(client.hkeys(WORKERS_KEY))
        started = [
            self.spawn("worker", [str(BIN / "ddim-invert"), "worker"], **env) for _ in range(count)
        ]
        if wait:
            wait_for(
                lambda: (
                    len(set(client.hkeys(WORKERS_KEY)) - before) >= count
                    or any(p.poll() is not None for p in started)
                ),
                EVENT_GUARD_S,
                f"{count} worker(s) to register",
            )
            for process in started:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"a worker exited with {process.returncode}: {self.log_text()}"
                    )
        client.close()
        return started

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in self.logs.glob("*.log"))

    def stop(self, process: subprocess.Popen[bytes]) -> int:
        """SIGTERM, then wait for the process's exit (its exit code): a worker finishes its
        batch first. One that outlives STOP_GUARD_S fails the test with the logs."""
        process.terminate()
        try:
            return process.wait(STOP_GUARD_S)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"pid {process.pid} outlived SIGTERM by {STOP_GUARD_S} s: {self.log_text()}"
            )

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.terminate()
        for process in self.started:
            try:
                process.wait(STOP_GUARD_S)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def processes(service_env: dict[str, str], tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(service_env, tmp_path)
    yield procs
    procs.stop_all()


@dataclass
class SharedService:
    """A gateway and a worker with default settings, on a Redis of their own."""

    url: str
    env: dict[str, str]
    processes: Processes


@pytest.fixture(scope="session")
def shared_stack(
    tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path
) -> Iterator[SharedService]:
    server = RedisServer(tmp_path_factory.mktemp("shared-redis"))
    server.start()
    procs = Processes(
        subprocess_env(server.url, model_cache_dir), tmp_path_factory.mktemp("shared-logs")
    )
    try:
        procs.worker(wait=False)  # its model loads while the gateway starts
        url = procs.gateway()
        wait_for(lambda: _is_ready(url), EVENT_GUARD_S, "the shared worker to be ready")
        yield SharedService(url, procs.env, procs)
    finally:
        procs.stop_all()
        server.stop()


def _is_ready(url: str) -> bool:
    """The gateway is ready and a worker is live (readiness alone needs no worker)."""
    import httpx

    answer = httpx.get(url + "/v1/capacity")  # the shared stack runs without API keys
    return answer.status_code == 200 and bool(answer.json()["workers"])


@pytest.fixture
def shared_service(shared_stack: SharedService) -> SharedService:
    """The session's running service, for tests that need no settings of their own and no
    empty Redis: starting a worker costs seconds (torch, diffusers, the model, a warm-up),
    and most end-to-end tests only need one that works. It is checked alive for each test.
    """
    for process in shared_stack.processes.started:
        if process.poll() is not None:
            pytest.fail(f"the shared service died: {shared_stack.processes.log_text()}")
    return shared_stack


@pytest.fixture
def shared_processes(shared_service: SharedService, tmp_path: Path) -> Iterator[Processes]:
    """Processes of this test's own on the shared service's Redis (an extra gateway with
    other settings, say), stopped after it."""
    procs = Processes(shared_service.env, tmp_path)
    yield procs
    procs.stop_all()

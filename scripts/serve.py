"""`make serve`: a whole inversion service on this machine, in one command.

Starts a private `redis-server` when none answers at INVERSION_REDIS_URL (one that
answers is used, and named with its database), one gateway on :8000 (INVERSION_PORT)
and one worker with the offline `tiny` model unless INVERSION_MODEL says otherwise,
prints the URL, and stops everything on Ctrl+C.
Authentication is off here (INVERSION_AUTH_DISABLED=true): this is for local use only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

BIN = Path(sys.executable).parent


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except Exception:
        return False


def where(url: str) -> str:
    """The URL without its password, and its database: where the service's keys go."""
    import redis

    kwargs = redis.Redis.from_url(url).connection_pool.connection_kwargs
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.hostname or ""
        user = f"{parts.username}:***@" if parts.username else ":***@"
        netloc = user + host + (f":{parts.port}" if parts.port else "")
        url = urlunsplit(parts._replace(netloc=netloc))
    return f"{url} (database {kwargs.get('db', 0)})"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    env = dict(os.environ)
    env.setdefault("INVERSION_AUTH_DISABLED", "true")
    env.setdefault("PYTHONUNBUFFERED", "1")
    children: list[subprocess.Popen[bytes]] = []
    url = env.get("INVERSION_REDIS_URL", "redis://127.0.0.1:6379/0")
    if redis_answers(url):
        print(
            f"using the Redis that answers at {where(url)}: the service's keys go there "
            "(set INVERSION_REDIS_URL to use another)",
            flush=True,
        )
    else:
        binary = shutil.which("redis-server")
        if binary is None:
            print(
                f"No Redis answers at {url} and redis-server is not installed.\n"
                "Install it (apt-get install redis-server, brew install redis) or set "
                "INVERSION_REDIS_URL to a running Redis.",
                file=sys.stderr,
            )
            return 2
        port = free_port()
        data = tempfile.mkdtemp(prefix="inversion-redis-")
        children.append(
            subprocess.Popen(
                [
                    *(binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", data),
                    *("--appendonly", "yes", "--appendfsync", "everysec"),
                    *("--maxmemory-policy", "noeviction"),
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        url = f"redis://127.0.0.1:{port}/0"
        env["INVERSION_REDIS_URL"] = url
        for _ in range(100):
            if redis_answers(url):
                break
            time.sleep(0.05)
        print(f"started a private redis-server at {url} (data in {data})")
    gateway_port = env.setdefault("INVERSION_PORT", "8000")
    children.append(subprocess.Popen([str(BIN / "ddim-invert"), "gateway"], env=env))
    children.append(subprocess.Popen([str(BIN / "ddim-invert"), "worker"], env=env))
    base = f"http://127.0.0.1:{gateway_port}"

    def stop(*_: object) -> None:
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for _ in range(1200):
        try:
            with urllib.request.urlopen(base + "/v1/capacity", timeout=1) as answer:
                # A live worker: readiness alone needs none (jobs would queue).
                if answer.status == 200 and json.loads(answer.read())["workers"]:
                    break
        except Exception:
            pass
        if any(child.poll() is not None for child in children):
            print("a service process exited during start-up", file=sys.stderr)
            stop()
        time.sleep(0.1)
    model = env.get("INVERSION_MODEL", "tiny")
    print(f"\nDDIM inversion service ready at {base} (model {model}); API docs at {base}/docs")
    print("Press Ctrl+C to stop.\n", flush=True)
    while all(child.poll() is None for child in children):
        time.sleep(0.5)
    print("a service process exited; stopping the others", file=sys.stderr)
    stop()
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""`make serve` (scripts/serve.py) on a Redis that already answers: it says which one."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis

from ddim_inversion.keys import WORKERS_KEY
from tests.conftest import (
    EVENT_GUARD_S,
    ROOT,
    STOP_GUARD_S,
    RedisServer,
    free_port,
    subprocess_env,
)

pytestmark = pytest.mark.e2e


def test_serve_names_the_redis_it_found_and_its_database_and_uses_it(
    redis_server: RedisServer, model_cache_dir: Path
):
    url = redis_server.url.rsplit("/", 1)[0] + "/5"  # not the default database
    client = redis.Redis.from_url(url)
    client.flushdb()
    env = subprocess_env(url, model_cache_dir) | {"INVERSION_PORT": str(free_port())}
    serve = subprocess.Popen(
        [sys.executable, "scripts/serve.py"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in serve.stdout], daemon=True).start()
    try:
        seen = [lines.get(timeout=EVENT_GUARD_S)]
        while "service ready at" not in seen[-1]:
            seen.append(lines.get(timeout=EVENT_GUARD_S))
        assert seen[0].startswith(f"using the Redis that answers at {url} (database 5)"), seen
        assert client.hlen(WORKERS_KEY) == 1  # its worker announced itself there
    finally:
        serve.terminate()  # serve.py stops its gateway and worker, then exits
        assert serve.wait(STOP_GUARD_S) == 0
        client.flushdb()
        client.close()

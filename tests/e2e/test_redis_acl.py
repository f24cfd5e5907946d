"""Compose's Redis ACL on a real redis-server, with the real gateway and worker on top.

docker/redis-start.sh runs as compose runs it, REDIS_PASSWORD set; a stand-in for the
image's entrypoint starts the local redis-server with docker/redis.conf (its container
paths and port swapped for the test's) and an extra admin user that reads the ACL log.
The service then uses the Redis URL written in docker-compose.yml.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from pathlib import Path

import httpx
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.compose_files import (
    COMPOSE,
    REDIS_CONF,
    REDIS_START,
    environment,
    load_compose,
)
from tests.conftest import EVENT_GUARD_S, SAMPLES, Processes, free_port, subprocess_env, wait_for

pytestmark = pytest.mark.e2e

ADMIN = "acl-test-admin"


def local_conf(directory: Path, port: int) -> Path:
    """docker/redis.conf, with what only makes sense in the container replaced."""
    container_only = ("dir", "bind", "port", "appendonly", "appendfilename", "maxmemory")
    kept = [
        line
        for line in REDIS_CONF.read_text().splitlines()
        if line.split()[:1] and line.split()[0] not in container_only
    ]
    kept += [f"dir {directory}", "bind 127.0.0.1", f"port {port}", "appendonly no"]
    conf = directory / "redis.conf"
    conf.write_text("\n".join(kept) + "\n")
    return conf


def entrypoint_stand_in(directory: Path, conf: Path, admin_password: str) -> Path:
    bin_dir = directory / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "docker-entrypoint.sh"
    shim.write_text(
        "#!/bin/sh\n"
        '[ "$1" = redis-server ] && [ "$2" = /usr/local/etc/redis/redis.conf ] || exit 64\n'
        "shift 2\n"
        f'exec redis-server {conf} "$@" --user {ADMIN} on ">{admin_password}" "~*" "&*" +@all\n'
    )
    shim.chmod(0o755)
    return bin_dir


def test_compose_redis_admits_the_service_user_only_and_the_service_works_through_it(
    tmp_path, model_cache_dir
):
    port, password, admin_password = free_port(), secrets.token_hex(16), secrets.token_hex(16)
    bin_dir = entrypoint_stand_in(tmp_path, local_conf(tmp_path, port), admin_password)
    compose = load_compose(COMPOSE)
    template = environment(compose["services"]["gateway"])["INVERSION_REDIS_URL"]
    url = re.sub(r"\$\{REDIS_PASSWORD:\?[^}]+\}", password, template)
    url = url.replace("@redis:6379/", f"@127.0.0.1:{port}/")

    processes = Processes(subprocess_env(url, model_cache_dir), tmp_path)
    try:
        path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
        processes.spawn("redis", ["sh", str(REDIS_START)], REDIS_PASSWORD=password, PATH=path)
        service = redis.Redis.from_url(url)
        wait_for(service.ping, EVENT_GUARD_S, "redis-server to admit the service user")

        once = Retry(NoBackoff(), 0)  # a refused login is final: do not retry it
        for credentials in ({}, {"username": "default", "password": ""}, {"password": "x"}):
            intruder = redis.Redis(port=port, retry=once, **credentials)
            with pytest.raises(redis.exceptions.AuthenticationError):
                intruder.ping()
        wrong = redis.Redis(port=port, username="inversion", password="wrong", retry=once)
        with pytest.raises(redis.exceptions.AuthenticationError):
            wrong.ping()
        for dangerous in (
            service.flushall,
            lambda: service.config_set("maxmemory", "1"),
            lambda: service.acl_setuser("x"),
            lambda: service.keys("*"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                dangerous()

        # Compose's health check, as its shell would run it, against this server.
        probe = " ".join(compose["services"]["redis"]["healthcheck"]["test"][1:])
        probe = probe.replace("$$", "$").replace("redis-cli ", f"redis-cli -p {port} ", 1)
        for given, healthy in ((password, 0), ("wrong", 1)):
            done = subprocess.run(["sh", "-c", probe], env={"REDIS_PASSWORD": given, "PATH": path})
            assert done.returncode == healthy

        # The service works through that user: nothing it does is refused.
        base = processes.gateway()
        processes.worker()
        with (SAMPLES / "chelsea.png").open("rb") as handle:
            answer = httpx.post(
                base + "/v1/inversions",
                data={"prompt": "a cat", "num_inference_steps": "3"},
                files={"image": ("chelsea.png", handle, "image/png")},
                headers={"Prefer": "wait=60"},
                timeout=EVENT_GUARD_S,
            )
        assert answer.status_code == 200 and answer.json()["status"] == "succeeded", answer.text
        latents = httpx.get(
            f"{base}/v1/inversions/{answer.json()['id']}/latents", timeout=EVENT_GUARD_S
        )
        assert latents.status_code == 200 and latents.content
        admin = redis.Redis(port=port, username=ADMIN, password=admin_password)
        refused = [
            entry
            for entry in admin.acl_log()
            if entry.get("username") == "inversion" and entry.get("reason") != "auth"
        ]
        denied = sorted({f"{e['reason']} {e['object']}" for e in refused})
        assert denied == [
            "command acl|setuser",
            "command config|set",
            "command flushall",
            "command keys",
        ], f"the service was refused more than the test's own probes: {denied}"
    finally:
        processes.stop_all()

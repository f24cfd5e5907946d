"""Hostile images against a real `ddim-invert gateway` process: a decode past its CPU
limit kills its decoder process, which is replaced, while the gateway serves everyone else.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from service import auth
from tests import hostile_images
from tests.conftest import EVENT_GUARD_S, Processes, RedisServer, subprocess_env, wait_for

pytestmark = pytest.mark.e2e

KEY_A, KEY_B = "decode-key-a", "decode-key-b"
GATEWAY = {
    "INVERSION_AUTH_DISABLED": "false",
    "INVERSION_API_KEY_HASHES": ",".join(auth.key_hash(k) for k in (KEY_A, KEY_B)),
    "INVERSION_DECODE_CPU_S": "1",
    "INVERSION_DECODE_WORKERS": "2",
    "INVERSION_MAX_DECODES_PER_KEY": "1",
    "INVERSION_MAX_JPEG_SCANS": "1000000",  # let the scans through to the CPU limit
}
PNG = hostile_images.encode(hostile_images.Image.new("RGB", (64, 64), (10, 120, 200)), "PNG")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@pytest.fixture
def gateway(
    redis_server: RedisServer, model_cache_dir: Path, tmp_path: Path
) -> Iterator[tuple[str, int]]:
    """The gateway's URL and process id (uvicorn serves in that process: one worker)."""
    procs = Processes(subprocess_env(redis_server.url, model_cache_dir), tmp_path)
    try:
        url = procs.gateway(**GATEWAY)
        yield url, procs.started[-1].pid
    finally:
        procs.stop_all()


def decoders(parent: int) -> dict[int, float]:
    """The decoder processes of the gateway `parent`: their CPU seconds, by process id."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # it ended meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent and b"service.decoder" in command:
            found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return found


def submit(url: str, key: str, image: bytes) -> httpx.Response:
    return httpx.post(
        url + "/v1/inversions",
        data={"prompt": "a cat", "num_inference_steps": "3", "resolution": "64"},
        files={"image": ("image", image)},
        headers={"X-API-Key": key},
        timeout=EVENT_GUARD_S,
    )


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_decode_past_its_cpu_limit_is_killed_while_the_gateway_serves_others(gateway):
    url, pid = gateway
    # 40,000 scans of 3000x3000 (1.2 MB): about 25 s of CPU on a 2-core x86 of 2020, far
    # past the 1 s limit on any machine.
    hostile = hostile_images.many_scans_jpeg(3000, 40_000)
    assert submit(url, KEY_A, PNG).status_code == 202
    ((first, cpu_before),) = decoders(pid).items()  # the decoder that served it, now idle
    # Nothing of the gateway's settings (its Redis URL, key hashes) reaches a decoder.
    assert b"INVERSION_" not in Path(f"/proc/{first}/environ").read_bytes()
    # Under a container's memory limit, the kernel kills a decoder before the gateway.
    assert Path(f"/proc/{first}/oom_score_adj").read_text().strip() == "1000"

    with ThreadPoolExecutor(1) as pool:
        attack = pool.submit(submit, url, KEY_A, hostile)
        # The hostile decode is under way (or already over) once the idle decoder works.
        wait_for(
            lambda: decoders(pid).get(first, float("inf")) > cpu_before + 0.2,
            EVENT_GUARD_S,
            "the hostile decode to start",
        )
        health = httpx.get(url + "/healthz", timeout=EVENT_GUARD_S)
        other = submit(url, KEY_B, PNG)
        refused = attack.result(timeout=EVENT_GUARD_S)

    assert health.status_code == 200
    assert other.status_code == 202, other.text
    assert refused.status_code == 422, refused.text
    problem = refused.json()
    assert (problem["code"], problem["field"]) == ("invalid_input", "image")
    assert problem["detail"].startswith("decoding the image")  # (used over 1 s of CPU)
    assert first not in decoders(pid)  # killed
    again = submit(url, KEY_A, PNG)  # on a decoder that replaced it
    assert again.status_code == 202, again.text
    assert decoders(pid) and first not in decoders(pid)

"""The bounded burst load test (bench/load.py) passes: no 5xx, every accepted job ends."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import EVENT_GUARD_S, ROOT

pytestmark = pytest.mark.e2e

ARGS = ["--clients", "8", "--jobs-per-client", "3", "--steps", "3", "--timeout", "120"]


def test_burst_load_has_no_5xx_and_no_lost_jobs(service_env):
    env = {k: v for k, v in service_env.items() if k != "INVERSION_REDIS_URL"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load.py"), *ARGS],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=EVENT_GUARD_S,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, run.stdout + run.stderr
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert run.returncode == 0, (result, run.stderr[-3000:])
    assert result["server_errors"] == 0
    assert not any(code.startswith("5") for code in result["status_codes"])
    assert result["submitted"] == result["unique_ids"] == 24
    assert result["completed"] == result["submitted"]
    assert result["succeeded"] == result["submitted"]
    assert result["lost"] == 0
    assert result["violations"] == []

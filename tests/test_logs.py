"""Logs are one JSON object per line in the gateway and the worker: no text a caller sends
(a field name, a prompt, a URL) can start a line of its own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ddim_inversion import logs

FORGED = "\ud800\n2026-12-07 00:00:00 CRITICAL admin key compromised\r\x1b[2J"
"""A lone surrogate, a newline, a line that reads as the log's own, CR and a terminal escape."""

_LOG_IN_A_PROCESS = """
import logging, sys
from ddim_inversion import logs
{configure}
forged = {forged!r}
logging.getLogger("service.errors").error("unknown field(s) %s", forged)
try:
    raise ValueError(forged)
except ValueError:
    logging.getLogger("rq.worker").exception("job failed: %s", forged)
logging.getLogger("uvicorn.error").warning("%s", forged)
"""


@pytest.mark.parametrize(
    "configure",
    [
        # The gateway: what service.main gives uvicorn.
        "import logging.config; logging.config.dictConfig(logs.log_config('WARNING'))",
        # The worker: what worker.main runs first.
        "logs.configure('INFO')",
    ],
)
def test_each_record_is_one_json_line_whatever_it_quotes(configure):
    script = _LOG_IN_A_PROCESS.format(configure=configure, forged=FORGED)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, check=True, timeout=60
    )
    lines = done.stderr.decode("ascii").splitlines()
    assert len(lines) == 3, lines
    records = [json.loads(line) for line in lines]
    assert [r["logger"] for r in records] == ["service.errors", "rq.worker", "uvicorn.error"]
    assert records[0]["message"] == f"unknown field(s) {FORGED}"
    assert records[0]["level"] == "ERROR"
    assert records[1]["exception"].endswith(f"ValueError: {FORGED}")
    assert records[2]["message"] == FORGED


def test_the_gateway_and_the_worker_log_through_it(monkeypatch):
    import service.main
    import worker.main

    given = {}
    monkeypatch.setattr(service.main.uvicorn, "run", lambda *a, **kw: given.update(kw))
    service.main.run()
    assert given["log_config"] == logs.log_config("WARNING")

    class Configured(Exception):
        pass

    def configure(level):
        raise Configured(level)

    monkeypatch.setattr(worker.main.logs, "configure", configure)
    with pytest.raises(Configured):
        worker.main.run()

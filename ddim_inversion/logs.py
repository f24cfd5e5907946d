"""Log records as one JSON object per line, for the gateway and the worker alike.

Log messages quote what callers sent (a field name, a prompt, a URL). Written as plain
text, a newline in such a value starts what reads as a new log line, forged by the
caller. `json.dumps(..., ensure_ascii=True)` escapes every control character, every
non-ASCII character and lone surrogates (which cannot even be encoded as UTF-8), so one
record is always exactly one line that parses back to what was logged.
"""

from __future__ import annotations

import json
import logging
import logging.config
from typing import Any


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message"[, "exception"][, "stack"]}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=True)


def log_config(level: str = "WARNING") -> dict[str, Any]:
    """A `logging.config.dictConfig` that sends every logger (uvicorn's, RQ's, ours) through
    one JsonFormatter handler on stderr, at `level` and above."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {
            "json": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        # uvicorn's loggers bring handlers of their own: replaced, so that they propagate.
        "loggers": {
            name: {"handlers": [], "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "rq.worker")
        },
        "root": {"handlers": ["json"], "level": level},
    }


def configure(level: str = "INFO") -> None:
    """Every log record of this process as one JSON line on stderr, at `level` and above."""
    logging.config.dictConfig(log_config(level))

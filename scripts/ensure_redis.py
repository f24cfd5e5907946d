"""Checks that a `redis-server` binary is on PATH: the tests start their own private Redis."""

import shutil
import sys

if shutil.which("redis-server") is None:
    sys.exit(
        "redis-server is not installed: the tests start a private Redis on a free port. "
        "Install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)."
    )
print("redis-server:", shutil.which("redis-server"))

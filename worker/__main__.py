import sys

from worker.main import run

sys.exit(run())

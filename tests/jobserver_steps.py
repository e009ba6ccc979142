"""Steps for tests/test_jobserver.py: what a worker sees, how it fails, how long it runs."""

from __future__ import annotations

import json
import os
import sys
import time


def report(out_file: str) -> None:
    """Write what the step ran with; print one line to each stream."""
    print("step says hello on stdout")
    print("step says hello on stderr", file=sys.stderr)
    with open(out_file, "w") as handle:
        json.dump({"pid": os.getpid(), "cwd": os.getcwd(), "marker": os.environ.get("QTRAJ_TEST_MARKER"),
                   "threads": os.environ.get("OMP_NUM_THREADS")}, handle)


def fail(message: str) -> None:
    raise ValueError(message)


def exit_with(code: int) -> None:
    sys.stdout.flush()
    os._exit(code)


def sleep(pid_file: str, seconds: float) -> None:
    with open(pid_file, "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(seconds)

"""Per-job logging for the workflow's scripts: everything a job says goes to its own log file, and long loops say
how far they are (`Progress`)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from qtraj.startup import (
    JOB_ENVIRONMENT,
    quiet_progress_bars,
    route_loguru_to_logging,
    silence_known_noise,
    skip_unused_imports,
)


@contextlib.contextmanager
def job_logging(log_file: str) -> Iterator[logging.Logger]:
    """Send logging (ours and the libraries', llm-compressor's loguru records too) to `log_file`, through one
    handler and at INFO and above; a failure is logged there, then re-raised. Nothing goes to the console.

    The error is also printed to stderr on one line, so Snakemake's own output names the problem
    without anyone having to open the log.
    """
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    # Before any step imports transformers (qtraj.startup): it then skips the packages qtraj never uses through
    # it (~2 CPU-s per job), and the known noise of torch, torchao and lm-eval stays off the console and the log.
    skip_unused_imports()
    silence_known_noise()
    # Set before the libraries are imported (the steps import them lazily): progress bars off (tqdm, which torch
    # has already imported, too), and llm-compressor's own (loguru) log into this job's file, through the handler
    # below, rather than onto Snakemake's console. Its `oneshot` would open LLM_COMPRESSOR_LOG_FILE as a second
    # writer (at DEBUG, repeating every message), so that is unset here.
    for variable, value in JOB_ENVIRONMENT.items():
        os.environ.setdefault(variable, value)
    quiet_progress_bars()
    os.environ.pop("LLM_COMPRESSOR_LOG_FILE", None)
    route_loguru_to_logging()
    handler = logging.FileHandler(log_file, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield logging.getLogger("qtraj")
    except Exception as error:
        logging.getLogger("qtraj").exception("job failed")
        print(f"qtraj: {type(error).__name__}: {error} (log: {log_file})", file=sys.stderr)
        raise
    finally:
        root.removeHandler(handler)
        handler.close()


class Progress:
    """Progress lines of a long loop in the job's log, with rate and time left:
    "validation loss: 40,960/163,840 tokens (25%), 2,048 tokens/s, 1 min 00 s left".

    A line when another `fraction` of the total is done or `max_interval_s` passed since the last one, but never
    two within `min_interval_s`, and a last one at the end when any came before: a loop shorter than `min_interval_s`
    says nothing. Lines go to `logger` at INFO, which in a job is its log only (`job_logging` writes nothing to the
    console) and elsewhere is not shown unless the caller set logging up. `clock` is for tests."""

    def __init__(self, logger: logging.Logger, what: str, total: int, unit: str, fraction: float = 0.1,
                 min_interval_s: float = 10.0, max_interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.what, self.total, self.unit = logger, what, total, unit
        self.fraction, self.min_interval_s, self.max_interval_s, self.clock = (fraction, min_interval_s,
                                                                                max_interval_s, clock)
        self.done, self.lines, self.finished = 0, 0, False
        self.started = self.last_line = clock()
        self.next_due = fraction * total

    def advance(self, amount: int = 1) -> None:
        """`amount` more of the total is done."""
        self.done += amount
        now = self.clock()
        since_last = now - self.last_line
        if self.done >= self.total:
            if self.lines and not self.finished:
                elapsed = now - self.started
                self._line(now, f"{self.what}: {self.total:,} {self.unit} in {format_duration(elapsed)} "
                                f"({_per_second(self.total, elapsed)} {self.unit}/s)")
            self.finished = True
            return
        if since_last < self.min_interval_s or (self.done < self.next_due and since_last < self.max_interval_s):
            return
        elapsed = now - self.started
        self._line(now, f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%), "
                        f"{_per_second(self.done, elapsed)} {self.unit}/s, "
                        f"{format_duration(remaining_seconds(elapsed, self.done, self.total))} left")
        while self.next_due <= self.done:
            self.next_due += self.fraction * self.total

    def _line(self, now: float, message: str) -> None:
        self.logger.info("%s", message)
        self.last_line, self.lines = now, self.lines + 1


def remaining_seconds(elapsed_s: float, done: int, total: int) -> float:
    """Time left at the average rate so far."""
    return elapsed_s / done * (total - done) if done else float("inf")


def _per_second(amount: float, seconds: float) -> str:
    per_second = amount / seconds if seconds > 0 else float("inf")
    return f"{per_second:,.0f}" if per_second >= 10 else f"{per_second:.2g}"


def format_duration(seconds: float) -> str:
    """`42 s`, `3 min 20 s`, `2 h 05 min`: what a person reads in a log line."""
    if seconds == float("inf"):
        return "unknown time"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"

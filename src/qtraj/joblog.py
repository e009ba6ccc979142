"""Per-job logging for the workflow's scripts: everything a job says goes to its own log file."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from qtraj.startup import (
    JOB_ENVIRONMENT,
    quiet_progress_bars,
    reconfigure_preloaded_logging,
    silence_known_noise,
    skip_unused_imports,
)


@contextlib.contextmanager
def job_logging(log_file: str) -> Iterator[logging.Logger]:
    """Send logging (ours and the libraries') to `log_file`; a failure is logged there, then re-raised.

    The error is also printed to stderr on one line, so Snakemake's own output names the problem
    without anyone having to open the log.
    """
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    # Before any step imports transformers (qtraj.startup): it then skips the packages qtraj never uses through
    # it (~2 CPU-s per job), and the known noise of torch, torchao and lm-eval stays off the console and the log.
    skip_unused_imports()
    silence_known_noise()
    # Set before the libraries are imported (the steps import them lazily): progress bars off (tqdm, which torch
    # has already imported, too), and llm-compressor's own (loguru) log into this job's file rather than onto
    # Snakemake's console.
    for variable, value in JOB_ENVIRONMENT.items():
        os.environ.setdefault(variable, value)
    quiet_progress_bars()
    os.environ["LLM_COMPRESSOR_LOG_FILE"] = str(log_file)
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    os.environ.setdefault("LLM_COMPRESSOR_LOG_FILE_LEVEL", "INFO")
    reconfigure_preloaded_logging()
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

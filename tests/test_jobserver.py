"""The job server (qtraj.jobserver): a step runs in a fork of it as it would in the job's own process — same streams,
directory, environment, exit status and numbers — and stops when the job is stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from qtraj import jobserver
from tests.conftest import REPO_ROOT

# the test's steps only: the server starts in a second instead of importing torch and the rest
LIGHT = ("qtraj.steps", "tests.jobserver_steps")


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))  # as the clients have it: the server imports the test's steps
    process = jobserver.start(str(tmp_path / "server-log"), preload=LIGHT, wait_seconds=30)
    assert process is not None, (tmp_path / "server-log" / jobserver.SERVER_LOG).read_text()
    address = os.environ[jobserver.SOCKET_VARIABLE]
    yield address
    jobserver.stop(process)
    assert not Path(address).exists()


def client(step: str, log_file: Path, address: str | None, cwd: Path, threads: int | None = None,
           extra_env: dict | None = None, wait: bool = True, **kwargs):
    """A job adapter as Snakemake runs one: a fresh Python calling run_step."""
    env = {key: value for key, value in os.environ.items() if key != jobserver.SOCKET_VARIABLE}
    env.update({"PYTHONPATH": str(REPO_ROOT), **(extra_env or {})})
    if address:
        env[jobserver.SOCKET_VARIABLE] = address
    code = (f"from qtraj.jobserver import run_step\n"
            f"run_step({step!r}, {str(log_file)!r}, {threads!r}, **{kwargs!r})\n")
    command = [sys.executable, "-c", code]
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_without_a_server_the_step_runs_in_the_adapters_process(tmp_path):
    result = client("tests.jobserver_steps:report", tmp_path / "job.log", None, tmp_path, threads=1,
                    out_file="seen.json")
    assert result.returncode == 0, result.stderr
    assert "in its own process" in (tmp_path / "job.log").read_text()
    assert "job server worker" not in (tmp_path / "job.log").read_text()


def test_a_worker_has_the_jobs_streams_directory_environment_and_threads(tmp_path, server):
    work = tmp_path / "work"
    work.mkdir()
    result = client("tests.jobserver_steps:report", Path("logs/job.log"), server, work, threads=3,
                    extra_env={"QTRAJ_TEST_MARKER": "from-the-client"}, out_file="seen.json")
    assert result.returncode == 0, result.stderr
    assert "step says hello on stdout" in result.stdout and "step says hello on stderr" in result.stderr
    seen = json.loads((work / "seen.json").read_text())  # relative paths: the job's directory
    assert seen["marker"] == "from-the-client" and seen["threads"] == "3" and seen["cwd"] == str(work)
    log = (work / "logs" / "job.log").read_text()
    assert "in a worker forked from the job server" in log and "done in" in log
    assert f"job server worker {seen['pid']}: exit 0, cpu_s" in log  # what Snakemake's benchmark cannot see


def test_a_failing_step_fails_the_job_with_its_error_on_stderr_and_in_the_log(tmp_path, server):
    result = client("tests.jobserver_steps:fail", tmp_path / "job.log", server, tmp_path, message="no such layer")
    assert result.returncode == 1
    assert "qtraj: ValueError: no such layer" in result.stderr and "Traceback" in result.stderr
    assert "no such layer" in (tmp_path / "job.log").read_text()
    exited = client("tests.jobserver_steps:exit_with", tmp_path / "exit.log", server, tmp_path, code=3)
    assert exited.returncode == 3


def test_stopping_the_job_stops_its_worker(tmp_path, server):
    adapter = client("tests.jobserver_steps:sleep", tmp_path / "job.log", server, tmp_path, wait=False,
                     pid_file=str(tmp_path / "worker.pid"), seconds=120)
    pid_file = tmp_path / "worker.pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and adapter.poll() is None, adapter.communicate()
        time.sleep(0.05)
    worker = int(pid_file.read_text())
    assert worker != adapter.pid
    adapter.send_signal(signal.SIGKILL)  # as Snakemake stops a job it gives up on
    adapter.wait()
    deadline = time.monotonic() + jobserver.KILL_GRACE_SECONDS + 10
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{worker}").exists()


def test_a_job_whose_import_time_environment_differs_runs_in_its_own_process(tmp_path, server):
    result = client("tests.jobserver_steps:report", tmp_path / "job.log", server, tmp_path,
                    extra_env={"HF_HOME": str(tmp_path / "another-hub-cache")}, out_file="seen.json")
    assert result.returncode == 0, result.stderr
    assert "in its own process" in (tmp_path / "job.log").read_text()
    server_log = (tmp_path / "server-log" / jobserver.SERVER_LOG).read_text()
    assert "environment differs from the server's in HF_HOME" in server_log


def test_the_server_exits_when_the_process_that_started_it_is_gone(tmp_path):
    address = str(tmp_path / "socket")
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    server = subprocess.Popen([sys.executable, "-m", "qtraj.jobserver", address, str(parent.pid), "qtraj.steps"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)
        # started by this test, not by `parent`: it notices at its first check that its parent is not `parent`
        assert server.wait(timeout=10) == 0
        assert not Path(address).exists()
    finally:
        parent.kill()
        server.kill()


def test_evaluation_on_the_server_gives_the_same_numbers_as_in_its_own_process(tmp_path, trained_checkpoint,
                                                                              token_stream, monkeypatch):
    """The real preload (torch, transformers, lm-eval...) and a real step: bit-identical results."""
    import numpy as np

    np.save(tmp_path / "validation.npy", token_stream)
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    process = jobserver.start(str(tmp_path / "server-log"), wait_seconds=120)
    assert process is not None
    address = os.environ[jobserver.SOCKET_VARIABLE]
    try:
        outputs = {}
        for where, socket_address in (("server", address), ("own", None)):
            out = tmp_path / f"{where}.parquet"
            result = client("evaluate_fp", tmp_path / f"{where}.log", socket_address, tmp_path, threads=1,
                            checkpoint_dir=str(trained_checkpoint), validation_tokens=str(tmp_path / "validation.npy"),
                            evaluation={"seq_len": 64, "batch_size": 4, "max_blocks": 8}, out_file=str(out))
            assert result.returncode == 0, result.stderr
            outputs[where] = pq.read_table(out).drop_columns(["created_at", "eval_seconds"]).to_pylist()
        assert "forked from the job server" in (tmp_path / "server.log").read_text()
        assert outputs["server"] == outputs["own"]
    finally:
        jobserver.stop(process)

"""The local job server: torch, transformers, llm-compressor and lm-eval are imported once per workflow run, and each
job runs in a process forked from that warm one instead of a fresh Python that imports them again.

Why by hand: a job of the default workflow spends 7-9 CPU-s importing those libraries before 1-8 s of work
(bench/workflow_jobs.py), 42% of `make run`. Snakemake starts a new interpreter for every `script:` job and has no
warm-worker mode; multiprocessing's forkserver runs the functions of one parent program, not the jobs of independent
client processes with their own stdout, working directory and environment. A fork of the warm server costs ~0.05 s.

How a job runs (`run_step`, called by each `scripts/*.py` adapter):
- QTRAJ_JOB_SERVER unset (a cluster job, a test, the server disabled): the step runs in the adapter's own process,
  exactly as before the server existed.
- Set: the adapter connects to the server's UNIX socket and sends the step, its arguments, its log file, its thread
  budget, its working directory, its environment and its stdout/stderr file descriptors. The server forks a manager,
  which forks the worker that runs the step (in its own process group, writing to the adapter's stdout and stderr,
  in the adapter's directory and environment) and sends the exit status back; the adapter exits with it, so
  Snakemake sees the job succeed or fail as if it had run in the adapter. If the adapter dies (Snakemake stops the
  job), the manager kills the worker's process group. The manager also appends the worker's CPU time and peak
  memory to the job's log, because Snakemake's `benchmark:` measures the adapter's process tree and so cannot see
  them (bench/workflow_jobs.py reads them from there).
- The server refuses a job (and the adapter runs it itself) when the job could differ from one run in a fresh
  process: another Python, a changed qtraj source file since the server imported it, or a different value of an
  environment variable that the preloaded libraries read at import (IMPORT_TIME_VARIABLES).

The Snakefile starts the server for local, non-dry runs on a machine without an NVIDIA GPU (`start`; CUDA does not
survive a fork after it was initialised, and llm-compressor queries the accelerator at import) and stops it when the
run ends; it also exits by itself when the Snakemake process that started it is gone. Its socket appears once the
imports are done (~6 s): the first jobs (corpus, tokenizer) run in their own processes meanwhile.
`job_server: false` in the config turns it off.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SOCKET_VARIABLE = "QTRAJ_JOB_SERVER"
# What the server imports before it forks: everything the heavy steps import lazily. A module that is not installed
# (an optional engine) is skipped; a job that needs more imports it in its worker.
PRELOAD = (
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "qtraj.steps",
    "qtraj.training",
    "qtraj.evaluation",
    "qtraj.accuracy",
    "qtraj.layer_errors",
    "qtraj.quantization",
    "qtraj.methods.rtn",
    "qtraj.methods.gptq",
    "qtraj.methods.awq",
    "qtraj.methods._llmcompressor",
    "llmcompressor",
    "llmcompressor.modifiers.quantization",
    "llmcompressor.modifiers.awq",
    "lm_eval.evaluator",
    "lm_eval.models.huggingface",
    "qtraj.sharpness",
    "qtraj.averaging",
    "qtraj.plotting",
    "matplotlib.pyplot",
)
# Environment variables that the preloaded libraries read once, at import (cache locations, offline modes, devices,
# thread layers): a job whose value differs from the server's runs in its own process. What a job sets for itself
# (OMP_NUM_THREADS via `steps.set_threads`, llm-compressor's logging via `job_logging`) is applied again in the
# worker.
IMPORT_TIME_VARIABLES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "CUDA_", "NVIDIA_",
                         "TOKENIZERS_", "LM_EVAL", "PYTHON", "MPL", "MATPLOTLIB", "XDG_CACHE_HOME", "HOME",
                         "LD_LIBRARY_PATH")
ACCEPTED, REFUSED = b"A", b"R"
KILL_GRACE_SECONDS = 5.0
SERVER_LOG = "job-server.log"  # in the results folder's logs/: one per results folder

log = logging.getLogger(__name__)


@dataclass
class Job:
    step: str  # a function of qtraj.steps, or "package.module:function"
    kwargs: dict
    log_file: str
    threads: int | None
    cwd: str = field(default_factory=os.getcwd)
    env: dict = field(default_factory=lambda: dict(os.environ))
    python: str = sys.executable


def run_step(step: str, log_file: str, threads: int | None = None, **kwargs) -> None:
    """Run the workflow step `step(**kwargs)` with its logging in `log_file` and `threads` threads: on the job server
    when one is running (QTRAJ_JOB_SERVER), else here. A failed step exits this process non-zero."""
    job = Job(step, kwargs, log_file, threads)
    address = os.environ.get(SOCKET_VARIABLE)
    status = run_on_server(address, job) if address else None
    if status is None:
        execute(job)
    elif status != 0:
        sys.exit(status)


def execute(job: Job, forked: bool = False) -> None:
    """Run the job's step in this process, inside `job_logging`."""
    from qtraj import steps
    from qtraj.joblog import job_logging

    with job_logging(job.log_file) as job_log:
        if job.threads:
            steps.set_threads(job.threads)
        job_log.info("step %s %s", job.step, "in a worker forked from the job server" if forked else
                     "in its own process")
        started = time.perf_counter()
        resolve(job.step)(**job.kwargs)
        job_log.info("step %s done in %.2f s", job.step, time.perf_counter() - started)


def resolve(step: str):
    module, _, name = step.rpartition(":")
    return getattr(importlib.import_module(module or "qtraj.steps"), name)


# --- client -------------------------------------------------------------------------------------------------------

def run_on_server(address: str, job: Job) -> int | None:
    """The job's exit status from the server, or None when no server answers or it refused the job (run it here)."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(address)
    except OSError:
        client.close()
        return None  # no server there (any more): the step runs in this process
    with client:
        payload = pickle.dumps(job)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        socket.send_fds(client, [struct.pack("!Q", len(payload))], [sys.stdout.fileno(), sys.stderr.fileno()])
        client.sendall(payload)
        answer = _receive_exactly(client, 1)
        if answer != ACCEPTED:
            return None
        status = _receive_exactly(client, 4)
        if len(status) < 4:
            print(f"qtraj: the job server stopped while running step {job.step}; see {job.log_file}. "
                  "Rerun the workflow (the job is redone), or set job_server: false in the config.", file=sys.stderr)
            return 1
        return struct.unpack("!i", status)[0]


def _receive_exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


# --- server -------------------------------------------------------------------------------------------------------

def serve(address: str, parent_pid: int, preload: tuple[str, ...] = PRELOAD) -> None:
    """Accept jobs on `address` until the process `parent_pid` is gone or SIGTERM arrives."""
    started = time.perf_counter()
    environment = dict(os.environ)  # as Snakemake gave it, before the imports add their own
    imported = preload_modules(preload)
    # The socket appears under its address only now: jobs that start during the imports (the corpus and tokenizer
    # steps, which need none of them) find no server and run in their own process instead of waiting for it.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address + ".binding")
    listener.listen(256)
    os.rename(address + ".binding", address)
    log.info("preloaded %d modules in %.1f s; serving on %s", len(imported), time.perf_counter() - started, address)
    snapshot = ServerState.of(environment)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # managers are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener.settimeout(1.0)
    try:
        while _alive(parent_pid):
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            if os.fork() == 0:
                listener.close()
                _manage(connection, snapshot)  # never returns
            connection.close()
    finally:
        listener.close()
        for path in (address, address + ".binding"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def preload_modules(names: tuple[str, ...]) -> list[str]:
    """Import what jobs would, with the same start-up settings as a job (qtraj.startup)."""
    from qtraj.startup import JOB_ENVIRONMENT, quiet_progress_bars, silence_known_noise, skip_unused_imports

    skip_unused_imports()
    silence_known_noise()
    for variable, value in JOB_ENVIRONMENT.items():  # some are read at import (huggingface_hub's progress bars)
        os.environ.setdefault(variable, value)
    os.environ.setdefault("TQDM_DISABLE", "1")
    imported = []
    for name in names:
        try:
            importlib.import_module(name)
            imported.append(name)
        except ImportError as error:  # an optional engine that is not installed
            log.info("not preloaded: %s (%s)", name, error)
    quiet_progress_bars()
    return imported


@dataclass(frozen=True)
class ServerState:
    """What a job must share with the server to run in a fork of it, as captured when the preload finished."""

    python: str
    variables: dict  # the import-time variables of the server's environment as it started
    added: dict  # what the imports (and qtraj.startup) put into the environment: a fresh job's imports would too
    sources: dict  # qtraj source file -> mtime

    @classmethod
    def of(cls, started_with: dict) -> ServerState:
        added = {key: value for key, value in os.environ.items() if key not in started_with}
        return cls(sys.executable, import_time_variables(started_with), added, qtraj_sources())

    def refusal(self, job: Job) -> str | None:
        """Why `job` cannot run in a fork of this server, or None."""
        if os.path.realpath(job.python) != os.path.realpath(self.python):
            return f"another Python ({job.python})"
        variables = import_time_variables(job.env)
        if variables != self.variables:
            changed = sorted(key for key in variables.keys() | self.variables.keys()
                             if variables.get(key) != self.variables.get(key))
            return f"environment differs from the server's in {', '.join(changed)}"
        if qtraj_sources() != self.sources:
            return "qtraj's source changed since the server imported it"
        return None


def import_time_variables(environment: dict) -> dict:
    from qtraj.startup import JOB_ENVIRONMENT

    return {key: value for key, value in environment.items()
            if key.startswith(IMPORT_TIME_VARIABLES) and key not in JOB_ENVIRONMENT}


def qtraj_sources() -> dict:
    package = Path(__file__).resolve().parent
    return {str(path): path.stat().st_mtime_ns for path in sorted(package.rglob("*.py"))}


def _alive(pid: int) -> bool:
    return os.getppid() == pid


def _manage(connection: socket.socket, server: ServerState) -> None:
    """The manager of one job (a fork of the server): start the worker, wait for it or for the client to go."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        connection.setblocking(True)
        job, streams = _receive_job(connection)
        refusal = server.refusal(job)
        job.env = {**server.added, **job.env}
        if refusal:
            log.info("refused step %s (%s): it runs in its own process", job.step, refusal)
            connection.sendall(REFUSED)
            code = 0
            return
        connection.sendall(ACCEPTED)
        worker = os.fork()
        if worker == 0:
            connection.close()
            _work(job, streams)  # never returns
        for descriptor in streams:
            os.close(descriptor)
        status, usage = _wait(worker, connection)
        _append_usage(job, worker, status, usage)
        with contextlib.suppress(OSError):
            connection.sendall(struct.pack("!i", status))
        code = 0
    except BaseException:  # noqa: BLE001 - a manager must never return into the server's accept loop
        log.exception("job manager failed")
    finally:
        os._exit(code)


def _receive_job(connection: socket.socket) -> tuple[Job, list[int]]:
    header, streams, _, _ = socket.recv_fds(connection, 8, 2)
    payload = _receive_exactly(connection, struct.unpack("!Q", header)[0])
    return pickle.loads(payload), streams


def _work(job: Job, streams: list[int]) -> None:
    """The worker: the job's streams, directory and environment, then the step; exits with the step's status."""
    code = 0
    try:
        os.setpgid(0, 0)  # the manager can stop the step and everything it started
        for signal_number in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(signal_number, signal.SIG_DFL)
        os.dup2(streams[0], 1)
        os.dup2(streams[1], 2)
        for descriptor in streams:
            os.close(descriptor)
        os.chdir(job.cwd)
        os.environ.clear()
        os.environ.update(job.env)
        root = logging.getLogger()  # as in a fresh process: the server's own log handler is not the job's
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)
        _fresh_random_state()
        execute(job, forked=True)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - the traceback goes where a fresh process would print it
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _fresh_random_state() -> None:
    """Unseeded random streams as a fresh process would have them, not copies of the server's (the steps seed
    what they need; this keeps anything that does not from repeating across jobs)."""
    import random

    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def _wait(worker: int, connection: socket.socket) -> tuple[int, object]:
    """The worker's exit status (128 + signal when killed) and resource usage; kills it if the client goes."""
    exited = os.pidfd_open(worker)
    try:
        while True:
            ready, _, _ = select.select([exited, connection], [], [])
            if exited in ready:
                break
            try:
                gone = not connection.recv(1, socket.MSG_PEEK)
            except OSError:
                gone = True
            if gone:  # the client is gone: Snakemake stopped the job
                log.info("client of step worker %d gone: stopping it", worker)
                _stop_group(worker, exited)
                break
        _, status, usage = os.wait4(worker, 0)
    finally:
        os.close(exited)
    code = os.waitstatus_to_exitcode(status)
    return (128 - code if code < 0 else code), usage


def _stop_group(worker: int, exited: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker, signal.SIGTERM)
    ready, _, _ = select.select([exited], [], [], KILL_GRACE_SECONDS)
    if not ready:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker, signal.SIGKILL)


def _append_usage(job: Job, worker: int, status: int, usage) -> None:
    """The worker's CPU and peak memory, in the job's log (Snakemake's benchmark cannot see the worker)."""
    with contextlib.suppress(OSError), open(os.path.join(job.cwd, job.log_file), "a") as job_log:
        job_log.write(f"job server worker {worker}: exit {status}, cpu_s {usage.ru_utime + usage.ru_stime:.2f}, "
                      f"max_rss_mb {usage.ru_maxrss / 1024:.1f}\n")


# --- starting and stopping, for the Snakefile -----------------------------------------------------------------------

def should_start(local_exec: bool, enabled: bool) -> bool:
    """A server only helps local runs; it is not fork-safe with CUDA (see the module's docstring)."""
    return local_exec and enabled and not Path("/dev/nvidia0").exists() and sys.platform == "linux"


def start(log_dir: str, preload: tuple[str, ...] = PRELOAD,
          wait_seconds: float | None = None) -> subprocess.Popen | None:
    """Start a server for this process's jobs and point QTRAJ_JOB_SERVER at it. Jobs run in their own processes
    until it has imported its modules (a few seconds), and throughout if it fails to start (see its log).
    `wait_seconds`: wait until it serves (None: do not wait); None is returned if it is not serving by then."""
    folder = tempfile.mkdtemp(prefix="qtraj-jobs-")  # private (0700): only this user can send jobs
    address = os.path.join(folder, "socket")
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(log_dir, SERVER_LOG), "w") as server_log:
        server = subprocess.Popen([sys.executable, "-m", "qtraj.jobserver", address, str(os.getpid()), *preload],
                                  stdin=subprocess.DEVNULL, stdout=server_log, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # Ctrl-C stops the jobs; the server follows Snakemake
    deadline = time.monotonic() + (wait_seconds or 0.0)
    while wait_seconds is not None and not os.path.exists(address):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            print(f"qtraj: the job server did not start (see {Path(log_dir, SERVER_LOG)}); jobs run in their own "
                  "processes", file=sys.stderr)
            return None
        time.sleep(0.02)
    os.environ[SOCKET_VARIABLE] = address
    return server


def stop(server: subprocess.Popen | None) -> None:
    os.environ.pop(SOCKET_VARIABLE, None)
    if server is None:
        return
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
    address = server.args[3]
    for path in (address, address + ".binding"):
        with contextlib.suppress(OSError):
            os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(address))


def main(argv: list[str] | None = None) -> None:
    address, parent_pid, *preload = argv if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(address, int(parent_pid), tuple(preload) if preload else PRELOAD)


if __name__ == "__main__":
    main()

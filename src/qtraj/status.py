"""How far a config's workflow has come (`qtraj status`): per trajectory, the checkpoints measured, pending and
failed, read from the results tree alone (per-job Parquet files and job logs), without Snakemake.

A checkpoint is done when every per-job file of its jobs (qtraj.plan.checkpoint_jobs) exists and is Parquet; failed
when one of those files is unreadable, or when a job that has not written its files, or the job that makes the
checkpoint (training, a cooldown branch, a download, a link, an average), logged a failure (qtraj.joblog writes
"job failed" into the job's log; a rerun starts the log afresh); pending otherwise. A job killed without a word (out
of memory, a time limit) leaves no failure in its log: its checkpoint counts as pending until it is rerun.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qtraj.config import trajectories
from qtraj.plan import checkpoint_jobs
from qtraj.results import unreadable_parquet_files
from qtraj.schema import SCHEMA_PATH, ConfigError, load_schema, read_yaml
from qtraj.sources import source_of
from qtraj.texttable import text_table

FAILURE_MARK = "ERROR qtraj: job failed"  # what qtraj.joblog.job_logging logs when a step raises


@dataclass
class TrajectoryStatus:
    run: str
    kind: str  # its source's (qtraj.sources): trained | cooldown | average | family | local | a plugin's
    done: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    failed_logs: list[str] = field(default_factory=list)  # the logs (or broken files) that say why
    jobs_done: int = 0
    jobs_total: int = 0

    @property
    def checkpoints(self) -> int:
        return len(self.done) + len(self.pending) + len(self.failed)


def results_dir_of(config_path: str | Path) -> str:
    """The `results_dir` a config file names (the schema's default when it names none), read without validating the
    rest: querying results needs no family file or checkpoint folder of the config to exist."""
    config = read_yaml(config_path)
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path}: the configuration must be a mapping of keys to values")
    results_dir = config.get("results_dir", load_schema(SCHEMA_PATH)["properties"]["results_dir"]["default"])
    if not isinstance(results_dir, str):
        raise ConfigError(f"{config_path}: config key 'results_dir': {results_dir!r} is not a folder name")
    return results_dir


def logged_failure(path: Path) -> bool:
    """Whether a job log records a failure (qtraj.joblog); a missing or unreadable log records none."""
    try:
        with path.open(errors="replace") as handle:
            return any(FAILURE_MARK in line for line in handle)
    except OSError:
        return False


def trajectory_status(config: dict, run: str, results_dir: str | Path) -> TrajectoryStatus:
    """Done, pending and failed checkpoints of one trajectory of a (validated) config, from `results_dir`."""
    results_dir = Path(results_dir)
    source = source_of(config, run)
    status = TrajectoryStatus(run, source.kind)
    for checkpoint in source.checkpoints(run):
        jobs = checkpoint_jobs(config, run, checkpoint)
        status.jobs_total += len(jobs)
        reasons = []
        complete = True
        for job in jobs:
            outputs = [results_dir / path for path in job.outputs()]
            broken = unreadable_parquet_files(outputs)
            reasons += broken
            if all(path.is_file() for path in outputs) and not broken:
                status.jobs_done += 1
                continue
            complete = False
            if logged_failure(results_dir / job.log()):
                reasons.append(str(results_dir / job.log()))
        if complete:
            status.done.append(checkpoint)
            continue
        making_log = source.making_log(run, checkpoint)  # the training, download, link or average job's
        if making_log is not None and logged_failure(results_dir / making_log):
            reasons.append(str(results_dir / making_log))
        if reasons:
            status.failed.append(checkpoint)
            status.failed_logs += [reason for reason in reasons if reason not in status.failed_logs]
        else:
            status.pending.append(checkpoint)
    return status


def workflow_status(config: dict, results_dir: str | Path | None = None) -> list[TrajectoryStatus]:
    """Every trajectory's status; `results_dir` None: the config's own."""
    results_dir = config["results_dir"] if results_dir is None else results_dir
    return [trajectory_status(config, run, results_dir) for run in trajectories(config)]


def render_status(statuses: list[TrajectoryStatus]) -> str:
    """One line per trajectory (checkpoints done / pending / failed, jobs done of all), the totals, then the logs of
    what failed."""
    rows = [[status.run, status.kind, status.checkpoints, len(status.done), len(status.pending), len(status.failed),
             f"{status.jobs_done}/{status.jobs_total}"] for status in statuses]
    total = [sum(row[index] for row in rows) for index in (2, 3, 4, 5)]
    jobs = f"{sum(status.jobs_done for status in statuses)}/{sum(status.jobs_total for status in statuses)}"
    lines = [text_table(["trajectory", "kind", "checkpoints", "done", "pending", "failed", "jobs done"],
                        [*rows, ["total", "", *total, jobs]], right={2, 3, 4, 5, 6})]
    failed_logs = [log for status in statuses for log in status.failed_logs]
    if failed_logs:
        lines += ["", "failed (each log says why; a broken Parquet file: delete it and rerun the workflow):"]
        lines += [f"  {log}" for log in failed_logs]
    return "\n".join(lines)

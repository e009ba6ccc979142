"""The Slurm profile: its refusal to submit with its variables unset (every run, Slurm's commands stubbed), and a
real Slurm cluster started on this machine (needs root and Debian's packages).

The real cluster runs with `make test-slurm` (`.ci/run` does): starts munged, MariaDB, slurmdbd, slurmctld and
slurmd with a fake GPU (tests/slurm/local-slurm.sh), runs a small qtraj workflow through `snakemake --profile
profiles/slurm`, checks that its jobs went through Slurm (sacct), that the results equal a local run's, and that a
rerun submits nothing; then stops exactly the daemons it started, by PID.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.test_workflow import SNAKEMAKE

SCRIPTS = REPO_ROOT / "tests" / "slurm"
ACCOUNT = "qtraj-test"
WORKFLOW_TIMEOUT = 900  # the plugin can wait forever on a broken status command: never let the test hang


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("the local Slurm cluster needs root and apt-get (Debian)")
    started = tmp_path_factory.mktemp("slurm") / "started"
    env = {**os.environ, "LOCAL_SLURM_STARTED": str(started), "SLURM_ACCOUNTING": "dbd",
           "SLURM_ACCOUNTS": ACCOUNT, "SLURM_FAKE_GPUS": "1"}
    try:
        subprocess.run([str(SCRIPTS / "local-slurm.sh")], env=env, check=True, timeout=600)
        yield
    finally:
        subprocess.run([str(SCRIPTS / "local-slurm-stop.sh"), str(started)], check=False, timeout=120)


def small_config(path: Path, corpus: Path, results_dir: Path) -> Path:
    config = yaml.safe_load((REPO_ROOT / "tests" / "configs" / "tiny.yaml").read_text())
    # one run, two methods, no averages, cooldowns or sharpness: the job count below is the plan
    config.update(results_dir=str(results_dir), runs={"wsd": {"schedule": "wsd"}}, averages={}, cooldowns={},
                  sharpness={"runs": False},
                  quantizations={"rtn-w4g16": config["quantizations"]["rtn-w4g16"],
                                 "bnb-int8": config["quantizations"]["bnb-int8"]})
    config["corpus"]["path"] = str(corpus)
    path.write_text(yaml.safe_dump(config))
    return path


def run_snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "QTRAJ_SLURM_PARTITION": "main", "QTRAJ_SLURM_ACCOUNT": ACCOUNT}
    result = subprocess.run([*SNAKEMAKE, "--directory", str(workdir), *args], capture_output=True, text=True,
                            env=env, timeout=WORKFLOW_TIMEOUT)
    if result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def comparable(results_dir: Path) -> list[tuple]:
    rows = pq.read_table(results_dir / "dataset" / "results.parquet").to_pylist()
    return sorted((row["run"], row["checkpoint"], row["quantization"], round(row["loss_fp"], 9),
                   round(row["loss_q"], 9)) for row in rows)


SLURM_COMMANDS = ("sbatch", "scontrol", "squeue", "sacct", "sacctmgr", "sinfo", "scancel", "srun")


def test_the_profile_submits_nothing_with_its_variables_unset(tmp_path, small_corpus):
    """The onstart check itself, through Snakemake and the Slurm plugin: with QTRAJ_SLURM_PARTITION and
    QTRAJ_SLURM_ACCOUNT unset, a real run (onstart does not run in a dry run) stops before the first submission,
    naming both, and creates no results folder. Slurm's commands are stubs that fail and record each call, so the
    test never reaches a cluster (nor waits on an absent controller, as the real `scontrol` does for ~10 s)."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "slurm-calls.txt"
    for command in SLURM_COMMANDS:
        (stubs / command).write_text(f'#!/bin/sh\necho "{command} $*" >> {calls}\necho "no Slurm here" >&2\nexit 1\n')
        (stubs / command).chmod(0o755)
    config = small_config(tmp_path / "config.yaml", small_corpus, tmp_path / "results")
    env = {key: value for key, value in os.environ.items() if not key.startswith("QTRAJ_SLURM_")}
    env["PATH"] = f"{stubs}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "--configfile", str(config),
                             "--profile", str(REPO_ROOT / "profiles" / "slurm")],
                            # seconds when the check works; without it the plugin waits on the stubs for good
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "profiles/slurm needs QTRAJ_SLURM_ACCOUNT, QTRAJ_SLURM_PARTITION set" in result.stderr, result.stderr[-3000:]
    assert "Nothing was submitted" in result.stderr
    assert "sbatch" not in (calls.read_text() if calls.exists() else "")
    assert not (tmp_path / "results").exists()


@pytest.mark.slurm
def test_the_slurm_profile_runs_the_workflow_through_slurm(local_slurm, tmp_path, small_corpus):
    profile = ["--profile", str(REPO_ROOT / "profiles" / "slurm"),
               # test-only: check job status every 2 s instead of the plugin's default 40 s
               "--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2"]
    slurm_dir, local_dir = tmp_path / "slurm", tmp_path / "local"
    for folder in (slurm_dir, local_dir):
        folder.mkdir()
    config = small_config(slurm_dir / "config.yaml", small_corpus, slurm_dir / "results")
    since = subprocess.run(["date", "+%Y-%m-%dT%H:%M:%S"], capture_output=True, text=True, check=True).stdout.strip()
    started = run_snakemake(slurm_dir, "--configfile", str(config), *profile)

    sacct = subprocess.run(["sacct", "-n", "-X", "-P", "-S", since, "-o", "JobID,State,Account,Partition"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    jobs = [line.split("|") for line in sacct if line]
    # every job but the local rules (aggregate, figure, all): data 5, training 1, fp 2, quantize (and evaluate) 4
    assert len(jobs) == 12, (jobs, started.stderr[-3000:])
    assert all(state == "COMPLETED" and account == ACCOUNT and partition == "main"
               for _, state, account, partition in jobs), jobs

    local_config = small_config(local_dir / "config.yaml", small_corpus, local_dir / "results")
    subprocess.run([*SNAKEMAKE, "--directory", str(local_dir), "--cores", "2", "--configfile", str(local_config)],
                   check=True, capture_output=True, timeout=WORKFLOW_TIMEOUT)
    assert comparable(slurm_dir / "results") == comparable(local_dir / "results")

    rerun = run_snakemake(slurm_dir, "--configfile", str(config), *profile)
    assert "Nothing to be done" in rerun.stdout + rerun.stderr
    assert "Submitted" not in rerun.stdout + rerun.stderr

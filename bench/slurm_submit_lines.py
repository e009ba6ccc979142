"""Print the sbatch lines the Slurm profile generates for a family's jobs, without a cluster.

The resources come from qtraj.resources (what the rules declare); the command line comes from the official
plugin's own builders (`get_submit_command`, `set_gres_string`), so this shows what `snakemake --profile
profiles/slurm` submits. Usage: .venv/bin/python bench/slurm_submit_lines.py [family ...] (default: olmo2-1b
olmo2-32b); partition and account from QTRAJ_SLURM_PARTITION / QTRAJ_SLURM_ACCOUNT as in the profile.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

from snakemake_executor_plugin_slurm.submit_string import get_submit_command
from snakemake_executor_plugin_slurm.utils import set_gres_string

from qtraj.config import load_config
from qtraj.families import configured_family
from qtraj.resources import job_resources


class Resources(dict):
    """Snakemake's job.resources: a mapping that also answers attribute access."""

    __getattr__ = dict.get


def submit_line(rule: str, family: str, revision: str, resources: dict, threads: int) -> str:
    job = SimpleNamespace(name=rule, threads=threads, resources=Resources(resources), is_group=lambda: False)
    params = {"run_uuid": "<run-uuid>", "slurm_logfile": f"logs/slurm/rule_{rule}/{family}_{revision}/%j.log",
              "comment_str": f"rule_{rule}_wildcards_{family}_{revision}",
              "account": f"-A {os.environ.get('QTRAJ_SLURM_ACCOUNT', '<account>')}",
              "partition": f"-p {os.environ.get('QTRAJ_SLURM_PARTITION', '<partition>')}", "workdir": "."}
    return get_submit_command(job, params) + set_gres_string(job)


def main(families: list[str]) -> None:
    config = load_config("config/paper.yaml")
    for slug in families:
        family = configured_family(config, slug)
        revision = "main"
        print(f"# {slug}: {family['repo']}, {family['parameters'] / 1e9:.1f} B parameters")
        for rule in ("evaluate_fp", "quantize", "sharpness"):
            resources = job_resources(rule, family["parameters"], config["resources"])
            print(f"{rule}: {submit_line(rule, slug, revision, resources, config['threads']['quantize'])}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["olmo2-1b", "olmo2-32b"])

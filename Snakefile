# qtraj: quantization robustness along training trajectories. Logic lives in src/qtraj/ and rules/common.smk.
import os

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from qtraj import jobserver as job_server
from qtraj.resources import unexpanded_profile_variables

min_version("9.20")


# The default config is read only when none is given: Snakemake merges --configfile into the
# `configfile:` directive's dict key by key, which would add the default runs to any other config.
if not config:

    configfile: "config/config.yaml"


report: "report/workflow.rst"


JOB_SERVER = []  # the running job server, if onstart started one


include: "rules/common.smk"
include: "rules/data.smk"


# the rules that make each source's checkpoint folders (qtraj.sources: runs, families, folders, cooldowns, ...)
for _rules in source_rule_files():

    include: _rules


include: "rules/quantize.smk"
include: "rules/evaluate.smk"
include: "rules/results.smk"


# Local runs send their jobs to one warm process that has the libraries imported (qtraj.jobserver): ~0.3 s to
# start a job instead of ~8 CPU-s. Cluster jobs, dry runs and `job_server: false` start every job fresh.
onstart:
    # before the first submission: an unset variable of profiles/slurm would reach sbatch literally
    if unset := unexpanded_profile_variables(workflow.resource_settings.default_resources, os.environ):
        raise WorkflowError(
            f"profiles/slurm needs {', '.join(unset)} set (e.g. `export QTRAJ_SLURM_PARTITION=gpu "
            "QTRAJ_SLURM_ACCOUNT=myproject`); to let the Slurm plugin pick your default account instead, delete "
            "slurm_account from profiles/slurm/config.v8+.yaml. Nothing was submitted."
        )
    claim_results()
    if job_server.should_start(workflow.local_exec, config["job_server"]):
        JOB_SERVER.append(job_server.start(LOGS))


onsuccess:
    job_server.stop(JOB_SERVER.pop() if JOB_SERVER else None)


onerror:
    job_server.stop(JOB_SERVER.pop() if JOB_SERVER else None)


rule all:
    default_target: True
    input:
        all_targets(),

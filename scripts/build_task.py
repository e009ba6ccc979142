from qtraj import steps
from qtraj.joblog import job_logging

with job_logging(snakemake.log[0]):  # noqa: F821 - `snakemake` is injected by the script directive
    steps.build_task(
        snakemake.input[0],  # noqa: F821
        snakemake.wildcards.task,  # noqa: F821
        snakemake.params.settings,  # noqa: F821
        snakemake.output[0],  # noqa: F821
    )

from qtraj import steps
from qtraj.joblog import job_logging

with job_logging(snakemake.log[0]):  # noqa: F821 - `snakemake` is injected by the script directive
    steps.average_checkpoints(
        list(snakemake.input.sources),  # noqa: F821
        snakemake.params.weights,  # noqa: F821
        snakemake.output[0],  # noqa: F821
        snakemake.wildcards.run,  # noqa: F821
        snakemake.wildcards.checkpoint,  # noqa: F821
    )

from qtraj import steps
from qtraj.joblog import job_logging

with job_logging(snakemake.log[0]):  # noqa: F821 - `snakemake` is injected by the script directive
    steps.download_checkpoint(
        snakemake.wildcards.run,  # noqa: F821
        snakemake.params.family,  # noqa: F821
        snakemake.params.revision,  # noqa: F821
        snakemake.input.tokenizer,  # noqa: F821
        snakemake.output[0],  # noqa: F821
    )

from qtraj import steps
from qtraj.joblog import job_logging

with job_logging(snakemake.log[0]):  # noqa: F821 - `snakemake` is injected by the script directive
    steps.local_tokenizer(snakemake.config, snakemake.wildcards.run, snakemake.output[0])  # noqa: F821

from qtraj import steps
from qtraj.joblog import job_logging

with job_logging(snakemake.log[0]):  # noqa: F821 - `snakemake` is injected by the script directive
    steps.tokenize_split(snakemake.input.split, snakemake.input.tokenizer, snakemake.output[0])  # noqa: F821

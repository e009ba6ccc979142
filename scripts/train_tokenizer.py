from qtraj import steps
from qtraj.joblog import job_logging

with job_logging(snakemake.log[0]):  # noqa: F821 - `snakemake` is injected by the script directive
    steps.train_tokenizer(snakemake.input.train, snakemake.output[0], snakemake.params.vocab_size)  # noqa: F821

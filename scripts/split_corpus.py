from qtraj import steps
from qtraj.joblog import job_logging

with job_logging(snakemake.log[0]):  # noqa: F821 - `snakemake` is injected by the script directive
    steps.split_corpus(
        snakemake.input.corpus,  # noqa: F821
        dict(snakemake.output.items()),  # noqa: F821
        snakemake.params.validation_fraction,  # noqa: F821
        snakemake.params.calibration_fraction,  # noqa: F821
    )

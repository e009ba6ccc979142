from qtraj import steps
from qtraj.joblog import job_logging

with job_logging(snakemake.log[0]):  # noqa: F821 - `snakemake` is injected by the script directive
    steps.plot_summary(
        snakemake.params.results_dir,  # noqa: F821
        snakemake.params.figure,  # noqa: F821
        snakemake.output[0],  # noqa: F821
    )

from qtraj import steps
from qtraj.joblog import job_logging

with job_logging(snakemake.log[0]):  # noqa: F821 - `snakemake` is injected by the script directive
    steps.aggregate(
        {table: list(getattr(snakemake.input, table)) for table in snakemake.params.tables},  # noqa: F821
        snakemake.params.dataset_dir,  # noqa: F821
    )

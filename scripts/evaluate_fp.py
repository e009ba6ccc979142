from qtraj import steps
from qtraj.joblog import job_logging

with job_logging(snakemake.log[0]):  # noqa: F821 - `snakemake` is injected by the script directive
    steps.set_threads(snakemake.threads)  # noqa: F821
    steps.evaluate_fp(
        snakemake.input.checkpoint,  # noqa: F821
        snakemake.input.validation,  # noqa: F821
        snakemake.params.evaluation,  # noqa: F821
        snakemake.output.result,  # noqa: F821
        snakemake.params.accuracy,  # noqa: F821
        snakemake.params.task_files,  # noqa: F821
        snakemake.output.accuracy,  # noqa: F821
    )

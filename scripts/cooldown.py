from qtraj import steps
from qtraj.joblog import job_logging

with job_logging(snakemake.log[0]):  # noqa: F821 - `snakemake` is injected by the script directive
    steps.set_threads(snakemake.threads)  # noqa: F821
    steps.cool_down(
        snakemake.params.run,  # noqa: F821
        snakemake.params.settings,  # noqa: F821
        snakemake.params.cooldown,  # noqa: F821
        snakemake.input.parent,  # noqa: F821
        snakemake.input.tokens,  # noqa: F821
        snakemake.output.checkpoint,  # noqa: F821
        snakemake.output.training_log,  # noqa: F821
    )

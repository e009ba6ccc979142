from qtraj import steps
from qtraj.joblog import job_logging

with job_logging(snakemake.log[0]):  # noqa: F821 - `snakemake` is injected by the script directive
    steps.set_threads(snakemake.threads)  # noqa: F821
    steps.train_run(
        snakemake.params.run,  # noqa: F821
        snakemake.params.settings,  # noqa: F821
        snakemake.input.tokens,  # noqa: F821
        snakemake.input.tokenizer,  # noqa: F821
        {int(step): path for step, path in snakemake.params.checkpoint_dirs.items()},  # noqa: F821
        snakemake.output.training_log,  # noqa: F821
        snakemake.params.resume_steps,  # noqa: F821
    )

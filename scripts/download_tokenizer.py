from qtraj import steps
from qtraj.joblog import job_logging

with job_logging(snakemake.log[0]):  # noqa: F821 - `snakemake` is injected by the script directive
    steps.download_tokenizer(
        snakemake.params.source,  # noqa: F821
        snakemake.output[0],  # noqa: F821
        # read from the config, not params: which revisions are selected must not rerun the tokenizer
        default_revision=steps.first_selected_revision(snakemake.config, snakemake.wildcards.run),  # noqa: F821
    )

from qtraj import steps
from qtraj.joblog import job_logging

with job_logging(snakemake.log[0]):  # noqa: F821 - `snakemake` is injected by the script directive
    steps.download_checkpoint(
        slug=snakemake.wildcards.run,  # noqa: F821
        source=snakemake.params.source,  # noqa: F821
        tokenizer_dir=snakemake.input.tokenizer,  # noqa: F821
        out_dir=snakemake.output[0],  # noqa: F821
    )

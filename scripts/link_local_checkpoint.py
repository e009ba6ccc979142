from qtraj import steps
from qtraj.joblog import job_logging

with job_logging(snakemake.log[0]):  # noqa: F821 - `snakemake` is injected by the script directive
    steps.link_local_checkpoint(
        source=snakemake.input.checkpoint,  # noqa: F821
        tokenizer_dir=snakemake.input.tokenizer,  # noqa: F821
        out_dir=snakemake.output[0],  # noqa: F821
        info=snakemake.params.info,  # noqa: F821
        allow_pickle=snakemake.params.allow_pickle,  # noqa: F821
    )

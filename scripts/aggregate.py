from qtraj import steps
from qtraj.joblog import job_logging

with job_logging(snakemake.log[0]):  # noqa: F821 - `snakemake` is injected by the script directive
    steps.aggregate(
        {
            "results": list(snakemake.input.results),  # noqa: F821
            "fp_evals": list(snakemake.input.fp_evals),  # noqa: F821
            "training_log": list(snakemake.input.training_log),  # noqa: F821
            "layer_errors": list(snakemake.input.layer_errors),  # noqa: F821
            "sharpness": list(snakemake.input.sharpness),  # noqa: F821
            "accuracy": list(snakemake.input.accuracy),  # noqa: F821
        },
        snakemake.params.dataset_dir,  # noqa: F821
    )

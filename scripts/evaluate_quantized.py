from qtraj import steps
from qtraj.joblog import job_logging

with job_logging(snakemake.log[0]):  # noqa: F821 - `snakemake` is injected by the script directive
    steps.set_threads(snakemake.threads)  # noqa: F821
    steps.evaluate_quantized(
        snakemake.input.model,  # noqa: F821
        snakemake.input.checkpoint,  # noqa: F821
        snakemake.params.spec,  # noqa: F821
        snakemake.input.fp_eval,  # noqa: F821
        snakemake.input.validation,  # noqa: F821
        snakemake.input.calibration,  # noqa: F821
        snakemake.params.evaluation,  # noqa: F821
        snakemake.params.calibration,  # noqa: F821
        snakemake.output.result,  # noqa: F821
        snakemake.output.layer_errors,  # noqa: F821
        snakemake.params.layer_error_rows,  # noqa: F821
        snakemake.params.accuracy,  # noqa: F821
        snakemake.params.task_files,  # noqa: F821
        snakemake.output.accuracy,  # noqa: F821
    )

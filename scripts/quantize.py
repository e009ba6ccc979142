from qtraj import steps
from qtraj.joblog import job_logging

with job_logging(snakemake.log[0]):  # noqa: F821 - `snakemake` is injected by the script directive
    steps.set_threads(snakemake.threads)  # noqa: F821
    steps.quantize_and_evaluate(
        checkpoint_dir=snakemake.input.checkpoint,  # noqa: F821
        spec=snakemake.params.spec,  # noqa: F821
        fp_eval=snakemake.input.fp_eval,  # noqa: F821
        validation_tokens=snakemake.input.validation,  # noqa: F821
        calibration_tokens=snakemake.input.calibration,  # noqa: F821
        evaluation=snakemake.params.evaluation,  # noqa: F821
        calibration=snakemake.params.calibration,  # noqa: F821
        out_file=snakemake.output.result,  # noqa: F821
        layer_errors_file=snakemake.output.layer_errors,  # noqa: F821
        layer_error_rows=snakemake.params.layer_error_rows,  # noqa: F821
        accuracy=snakemake.params.accuracy,  # noqa: F821
        task_files=snakemake.params.task_files,  # noqa: F821
        accuracy_file=snakemake.output.accuracy,  # noqa: F821
        packed_dir=snakemake.output.get("packed"),  # noqa: F821 - only when the config keeps packed models
    )

from qtraj.jobserver import run_step

# `snakemake` is injected by the script directive; the step runs on the job server when one is up (qtraj.jobserver)
sm = snakemake  # noqa: F821
run_step("quantize_and_evaluate", sm.log[0], sm.threads,
         checkpoint_dir=sm.input.checkpoint,
         spec=sm.params.spec,
         fp_eval=sm.input.fp_eval,
         validation_tokens=sm.input.validation,
         calibration_tokens=sm.input.calibration,
         evaluation=sm.params.evaluation,
         calibration=sm.params.calibration,
         out_file=sm.output.result,
         layer_errors_file=sm.output.layer_errors,
         layer_error_rows=sm.params.layer_error_rows,
         accuracy=sm.params.accuracy,
         task_files=sm.params.task_files,
         accuracy_file=sm.output.accuracy,
         packed_dir=sm.output.get("packed"))  # only when the config keeps packed models

from qtraj.jobserver import run_step

# `snakemake` is injected by the script directive; the step runs on the job server when one is up (qtraj.jobserver)
sm = snakemake  # noqa: F821
run_step("evaluate_fp", sm.log[0], sm.threads, checkpoint_dir=sm.input.checkpoint,
         validation_tokens=sm.input.validation,
         evaluation=sm.params.evaluation, out_file=sm.output.result, accuracy=sm.params.accuracy,
         task_files=sm.params.task_files, accuracy_file=sm.output.accuracy)

from qtraj.jobserver import run_step

# `snakemake` is injected by the script directive; the step runs on the job server when one is up (qtraj.jobserver)
sm = snakemake  # noqa: F821
run_step("sharpness", sm.log[0], sm.threads, checkpoint_dir=sm.input.checkpoint, validation_tokens=sm.input.validation,
         settings=sm.params.settings, out_file=sm.output[0])

from qtraj.jobserver import run_step

# `snakemake` is injected by the script directive; the step runs on the job server when one is up (qtraj.jobserver)
sm = snakemake  # noqa: F821
run_step("build_task", sm.log[0], validation_text=sm.input[0], name=sm.wildcards.task, settings=sm.params.settings,
         out_file=sm.output[0])

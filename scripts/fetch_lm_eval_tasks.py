from qtraj.jobserver import run_step

# `snakemake` is injected by the script directive; the step runs on the job server when one is up (qtraj.jobserver)
sm = snakemake  # noqa: F821
run_step("fetch_lm_eval_tasks", sm.log[0], names=sm.params.tasks, out_file=sm.output[0])

from qtraj.jobserver import run_step

# `snakemake` is injected by the script directive; the step runs on the job server when one is up (qtraj.jobserver)
sm = snakemake  # noqa: F821
run_step("average_checkpoints", sm.log[0], sm.threads, folders=list(sm.input.sources), weights=sm.params.weights,
         out_dir=sm.output[0], run=sm.wildcards.run, checkpoint=sm.wildcards.checkpoint)

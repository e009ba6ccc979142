from qtraj.jobserver import run_step

# `snakemake` is injected by the script directive; the step runs on the job server when one is up (qtraj.jobserver)
sm = snakemake  # noqa: F821
run_step("cool_down", sm.log[0], sm.threads, run=sm.params.run, settings=sm.params.settings,
         cooldown=sm.params.cooldown, parent_dir=sm.input.parent, train_tokens=sm.input.tokens,
         out_dir=sm.output.checkpoint, training_log=sm.output.training_log)

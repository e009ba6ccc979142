from qtraj.jobserver import run_step

# `snakemake` is injected by the script directive; the step runs on the job server when one is up (qtraj.jobserver)
sm = snakemake  # noqa: F821
run_step("train_run", sm.log[0], sm.threads, run=sm.params.run, settings=sm.params.settings,
         train_tokens=sm.input.tokens,
         tokenizer_dir=sm.input.tokenizer,
         checkpoint_dirs={int(step): path for step, path in sm.params.checkpoint_dirs.items()},
         training_log=sm.output.training_log, resume_steps=sm.params.resume_steps)

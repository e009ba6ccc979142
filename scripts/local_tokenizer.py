from qtraj.jobserver import run_step

# `snakemake` is injected by the script directive; the step runs on the job server when one is up (qtraj.jobserver)
sm = snakemake  # noqa: F821
run_step("local_tokenizer", sm.log[0], config=sm.config, run=sm.wildcards.run, out_dir=sm.output[0])

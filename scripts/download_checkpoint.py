from qtraj.jobserver import run_step

# `snakemake` is injected by the script directive; the step runs on the job server when one is up (qtraj.jobserver)
sm = snakemake  # noqa: F821
run_step("download_checkpoint", sm.log[0], slug=sm.wildcards.run, source=sm.params.source,
         tokenizer_dir=sm.input.tokenizer, out_dir=sm.output[0])

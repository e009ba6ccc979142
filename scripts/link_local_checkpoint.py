from qtraj.jobserver import run_step

# `snakemake` is injected by the script directive; the step runs on the job server when one is up (qtraj.jobserver)
sm = snakemake  # noqa: F821
run_step("link_local_checkpoint", sm.log[0], source=sm.input.checkpoint, tokenizer_dir=sm.input.tokenizer,
         out_dir=sm.output[0], info=sm.params.info, allow_pickle=sm.params.allow_pickle,
         allow_external_links=sm.params.allow_external_links)

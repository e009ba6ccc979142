from qtraj.jobserver import run_step

# `snakemake` is injected by the script directive; the step runs on the job server when one is up (qtraj.jobserver)
sm = snakemake  # noqa: F821
run_step("train_tokenizer", sm.log[0], train_split=sm.input.train, out_dir=sm.output[0],
         vocab_size=sm.params.vocab_size)

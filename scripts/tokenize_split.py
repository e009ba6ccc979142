from qtraj.jobserver import run_step

# `snakemake` is injected by the script directive; the step runs on the job server when one is up (qtraj.jobserver)
sm = snakemake  # noqa: F821
run_step("tokenize_split", sm.log[0], split_file=sm.input.split, tokenizer_dir=sm.input.tokenizer,
         out_file=sm.output[0], max_tokens_per_char=sm.params.get("max_tokens_per_char"))  # external models only

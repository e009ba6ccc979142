from qtraj.jobserver import run_step
from qtraj.steps import first_selected_revision

# `snakemake` is injected by the script directive; the step runs on the job server when one is up (qtraj.jobserver)
sm = snakemake  # noqa: F821
# read from the config, not params: which revisions are selected must not rerun the tokenizer
run_step("download_tokenizer", sm.log[0], source=sm.params.source, out_dir=sm.output[0],
         default_revision=first_selected_revision(sm.config, sm.wildcards.run))

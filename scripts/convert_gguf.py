from qtraj.jobserver import run_step

# `snakemake` is injected by the script directive; the step runs on the job server when one is up (qtraj.jobserver)
sm = snakemake  # noqa: F821
run_step("convert_gguf", sm.log[0], source=sm.params.source, out_dir=sm.output[0])

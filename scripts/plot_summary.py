from qtraj.jobserver import run_step

# `snakemake` is injected by the script directive; the step runs on the job server when one is up (qtraj.jobserver)
sm = snakemake  # noqa: F821
run_step("plot_summary", sm.log[0], results_dir=sm.params.results_dir, figure=sm.params.figure, out_file=sm.output[0])

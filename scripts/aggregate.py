from qtraj.jobserver import run_step

# `snakemake` is injected by the script directive; the step runs on the job server when one is up (qtraj.jobserver)
sm = snakemake  # noqa: F821
run_step("aggregate", sm.log[0], inputs={table: list(getattr(sm.input, table)) for table in sm.params.tables},
         output_dir=sm.params.dataset_dir)

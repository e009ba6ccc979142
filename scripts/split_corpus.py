from qtraj.jobserver import run_step

# `snakemake` is injected by the script directive; the step runs on the job server when one is up (qtraj.jobserver)
sm = snakemake  # noqa: F821
run_step("split_corpus", sm.log[0], corpus=sm.input.corpus, outputs=dict(sm.output.items()),
         validation_fraction=sm.params.validation_fraction, calibration_fraction=sm.params.calibration_fraction)

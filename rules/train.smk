# One training rule per run: a run saves all its checkpoints in one job, and each checkpoint is its own
# folder, so every downstream rule sees the same `checkpoints/{run}/{checkpoint}` path whatever the source.
for _run in RUNS:

    rule:
        name:
            f"train_{_run}"
        input:
            tokens=f"{RESULTS}/data/tokens/train.npy",
            tokenizer=f"{RESULTS}/data/tokenizer",
        output:
            checkpoints=[directory(path) for path in checkpoint_dirs(_run).values()],
            training_log=f"{RESULTS}/training/{_run}.parquet",
        log:
            f"{LOGS}/train/{_run}.log",
        benchmark:
            f"{RESULTS}/benchmarks/train/{_run}.tsv"
        conda:
            "../envs/qtraj.yaml"
        threads: config["threads"]["train"]
        params:
            run=_run,
            settings=training_settings(_run),
            checkpoint_dirs=checkpoint_dirs(_run),
        script:
            "../scripts/train.py"

# One training rule per run: a run saves all its checkpoints in one job, and each checkpoint is its own
# folder, so every downstream rule sees the same `checkpoints/{run}/{checkpoint}` path whatever the source.
for _run in SOURCE_NAMES["runs"]:

    rule:
        name:
            f"train_{_run}"
        input:
            tokens=f"{RESULTS}/data/tokens/train.npy",
            tokenizer=f"{RESULTS}/data/tokenizer",
        output:
            **kind_outputs("train", run=_run),
            checkpoints=[directory(path) for path in checkpoint_dirs(_run).values()],
        log:
            kind_log("train", run=_run),
        benchmark:
            f"{RESULTS}/benchmarks/train/{_run}.tsv"
        conda:
            "../envs/qtraj.yaml"
        threads: config["threads"]["train"]
        resources:
            **kind_resources("train", run=_run),
        params:
            run=_run,
            settings=training_settings(_run),
            checkpoint_dirs=checkpoint_dirs(_run),
            resume_steps=branch_steps(config, _run),
        script:
            "../scripts/train.py"

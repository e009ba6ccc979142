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
            training_log=result_file("training_log", 0).format(run=_run),
        log:
            f"{LOGS}/train/{_run}.log",
        benchmark:
            f"{RESULTS}/benchmarks/train/{_run}.tsv"
        conda:
            "../envs/qtraj.yaml"
        threads: config["threads"]["train"]
        resources:
            gpu=resource("train", "gpu", run=_run),
            cpus_per_gpu=resource("train", "cpus_per_gpu", run=_run),
            tasks_per_gpu=resource("train", "tasks_per_gpu", run=_run),
            mem_mb=resource("train", "mem_mb", run=_run),
            runtime=resource("train", "runtime", run=_run),
        params:
            run=_run,
            settings=training_settings(_run),
            checkpoint_dirs=checkpoint_dirs(_run),
            resume_steps=branch_steps(config, _run),
        script:
            "../scripts/train.py"


# One job per cooldown branch: resumes its run's checkpoint at the branch step and decays the LR.
rule cooldown:
    input:
        parent=cooldown_parent,
        tokens=f"{RESULTS}/data/tokens/train.npy",
    output:
        checkpoint=directory(f"{RESULTS}/checkpoints/{{run}}/{{checkpoint}}"),
        training_log=result_file("training_log", 1),
    log:
        f"{LOGS}/cooldown/{{run}}/{{checkpoint}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/cooldown/{{run}}/{{checkpoint}}.tsv"
    wildcard_constraints:
        run=COOLDOWN_PATTERN,
    conda:
        "../envs/qtraj.yaml"
    threads: config["threads"]["train"]
    resources:
        gpu=resource("train", "gpu"),
        cpus_per_gpu=resource("train", "cpus_per_gpu"),
        tasks_per_gpu=resource("train", "tasks_per_gpu"),
        mem_mb=resource("train", "mem_mb"),
        runtime=resource("train", "runtime"),
    params:
        run=lambda wildcards: wildcards.run,
        settings=lambda wildcards: training_settings(config["cooldowns"][wildcards.run]["from"]),
        cooldown=lambda wildcards: config["cooldowns"][wildcards.run],
    script:
        "../scripts/cooldown.py"

# One job per cooldown branch: resumes its run's checkpoint at the branch step and decays the LR.
rule cooldown:
    input:
        parent=cooldown_parent,
        tokens=f"{RESULTS}/data/tokens/train.npy",
    output:
        **kind_outputs("cooldown"),
        checkpoint=directory(f"{RESULTS}/checkpoints/{{run}}/{{checkpoint}}"),
    log:
        kind_log("cooldown"),
    benchmark:
        f"{RESULTS}/benchmarks/cooldown/{{run}}/{{checkpoint}}.tsv"
    wildcard_constraints:
        run=trajectories_of("cooldowns"),
    conda:
        "../envs/qtraj.yaml"
    threads: config["threads"]["train"]
    resources:
        **kind_resources("cooldown"),
    params:
        run=lambda wildcards: wildcards.run,
        settings=cooldown_settings,
        cooldown=cooldown_entry,
    script:
        "../scripts/cooldown.py"
